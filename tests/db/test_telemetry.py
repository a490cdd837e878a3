"""Spans and metrics against a real PostgreSQL: all three driver flavours, both pool classes.

The SDK's in-memory span exporter and metric reader receive what the pools emit; each test passes
its own providers (``tracer_provider=`` / ``meter_provider=``), so tests never share telemetry.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.telemetry import (
    ATTEMPT_COUNT,
    ATTEMPT_FAILED_EVENT,
    CHECKOUT_CONNECTED,
    CHECKOUT_SPAN,
    CHECKOUT_WAITED,
    CONNECT_SPAN,
    DURATION_BUCKETS,
)
from fault_tolerant_pool.testing import FaultProxy, PostgresServer
from tests.otel import Otel

from .client import ASYNC_FLAVOURS, FLAVOURS, POOLS, Client

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
async_flavours = pytest.mark.parametrize("flavour", ASYNC_FLAVOURS)
pools = pytest.mark.parametrize("poolclass", POOLS, ids=lambda p: p.__name__)

#: (kind, unit) of every metric, as the conventions give them (and ours, as
#: docs/opentelemetry.md lists).
CONVENTIONS = {
    "db.client.connection.count": ("updowncounter", "{connection}"),
    "db.client.connection.max": ("updowncounter", "{connection}"),
    "db.client.connection.idle.max": ("updowncounter", "{connection}"),
    "db.client.connection.pending_requests": ("updowncounter", "{request}"),
    "db.client.connection.timeouts": ("counter", "{timeout}"),
    "db.client.connection.create_time": ("histogram", "s"),
    "db.client.connection.wait_time": ("histogram", "s"),
    "db.client.connection.use_time": ("histogram", "s"),
    "fault_tolerant_pool.connect.attempts": ("counter", "{attempt}"),
    "fault_tolerant_pool.connect.failed_attempts": ("counter", "{attempt}"),
    "fault_tolerant_pool.connect.give_ups": ("counter", "{connect}"),
    "fault_tolerant_pool.connect.state": ("updowncounter", "{pool}"),
    "fault_tolerant_pool.connect.waiting": ("updowncounter", "{request}"),
    "fault_tolerant_pool.connect.fast_failures": ("counter", "{connect}"),
    "fault_tolerant_pool.checkout.rejected": ("counter", "{request}"),
    "fault_tolerant_pool.connect.outage.duration": ("histogram", "s"),
}


def pool_name(server: PostgresServer, port: int | None = None) -> str:
    return f"{server.host}:{port or server.port}/{server.dbname}"


def by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {span.context.span_id: span for span in spans}


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    if span.parent is None:
        return None
    return by_id(spans).get(span.parent.span_id)


async def checkout(client: Client) -> Any:
    """A checked-out connection (AsyncConnection or Connection) that the caller closes."""
    if client.async_engine is not None:
        return await client.async_engine.connect()
    return await asyncio.to_thread(client.engine.connect)


async def checkin(client: Client, conn: Any) -> None:
    if client.async_engine is not None:
        await conn.close()
    else:
        await asyncio.to_thread(conn.close)


@flavours
@pools
async def test_names_kinds_units_and_attributes(
    pg_server_session: PostgresServer, flavour: str, poolclass: type
) -> None:
    server, otel = pg_server_session, Otel()
    client = Client(server.url(flavour), flavour, poolclass=poolclass, **otel.engine_kw)
    assert await client.scalar() == 1
    assert await client.scalar() == 1
    creates = 2 if poolclass is FaultTolerantNullPool else 1  # the second checkout is instant
    name = pool_name(server)

    connects, checkouts = otel.spans(CONNECT_SPAN), otel.spans(CHECKOUT_SPAN)
    assert len(connects) == creates and len(checkouts) == creates
    for span in connects:
        assert span.kind is SpanKind.CLIENT and span.status.status_code is StatusCode.UNSET
        assert dict(span.attributes or {}) == {
            "db.system.name": "postgresql",
            "server.address": server.host,
            "server.port": server.port,
            "db.namespace": server.dbname,
            "db.client.connection.pool.name": name,
            ATTEMPT_COUNT: 1,
        }
        assert parent_of(span, otel.spans()) in checkouts
    for span in checkouts:
        attributes = span.attributes or {}
        assert span.kind is SpanKind.INTERNAL
        assert attributes["db.client.connection.pool.name"] == name
        assert (attributes[CHECKOUT_WAITED], attributes[CHECKOUT_CONNECTED]) == (False, True)

    metrics = otel.metrics()
    for metric_name, metric in metrics.items():
        assert (Otel.kind(metric), metric.unit) == CONVENTIONS[metric_name], metric_name
        for attributes, _ in Otel.points(metric):
            assert attributes["db.client.connection.pool.name"] == name
    assert set(CONVENTIONS) - set(metrics) == {
        "db.client.connection.timeouts",
        "fault_tolerant_pool.connect.failed_attempts",
        "fault_tolerant_pool.connect.give_ups",
        "fault_tolerant_pool.connect.outage.duration",  # no outage yet
    } | ({"db.client.connection.max"} if poolclass is FaultTolerantNullPool else set())
    for histogram in ("create_time", "wait_time", "use_time"):
        (point,) = metrics[f"db.client.connection.{histogram}"].data.data_points
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS  # seconds, not the ms default
    value = otel.value
    assert value("db.client.connection.create_time", metrics) == creates
    assert value("db.client.connection.wait_time", metrics) == 2
    assert value("db.client.connection.use_time", metrics) == 2
    assert value("fault_tolerant_pool.connect.attempts", metrics) == creates
    assert value("db.client.connection.pending_requests", metrics) == 0
    state = "db__client__connection__state"
    if poolclass is FaultTolerantQueuePool:
        assert value("db.client.connection.count", metrics, **{state: "idle"}) == 1
        assert value("db.client.connection.max", metrics) == 15  # pool_size 5 + max_overflow 10
        assert value("db.client.connection.idle.max", metrics) == 15  # overflow kept idle
    else:
        assert value("db.client.connection.count", metrics, **{state: "idle"}) == 0
        assert value("db.client.connection.idle.max", metrics) == 0
    assert value("db.client.connection.count", metrics, **{state: "used"}) == 0
    await client.dispose()
    otel.shutdown()


@flavours
@pools
async def test_used_and_idle_follow_checkouts_and_checkins(
    pg_server_session: PostgresServer, flavour: str, poolclass: type
) -> None:
    otel = Otel()
    client = Client(pg_server_session.url(flavour), flavour, poolclass=poolclass, **otel.engine_kw)
    keeps_idle = poolclass is FaultTolerantQueuePool

    def counts() -> tuple[int, int]:
        metrics = otel.metrics()
        count = "db.client.connection.count"
        return (
            otel.value(count, metrics, db__client__connection__state="used"),
            otel.value(count, metrics, db__client__connection__state="idle"),
        )

    first, second = await checkout(client), await checkout(client)
    assert counts() == (2, 0)
    await checkin(client, first)
    assert counts() == (1, 1 if keeps_idle else 0)
    third = await checkout(client)
    assert counts() == (2, 0)
    await checkin(client, second)
    await checkin(client, third)
    assert counts() == (0, 2 if keeps_idle else 0)
    metrics = otel.metrics()
    assert otel.value("db.client.connection.wait_time", metrics) == 3
    assert otel.value("db.client.connection.use_time", metrics) == 3
    await client.dispose()
    otel.shutdown()


@flavours
async def test_three_refused_attempts_then_a_success(
    pg_server: PostgresServer, fault_proxy: FaultProxy, flavour: str
) -> None:
    otel = Otel()
    url = pg_server.url(flavour, port=fault_proxy.port)
    client = Client(
        url, flavour, poolclass=FaultTolerantQueuePool, retry_initial_delay=0.01,
        retry_max_delay=0.02, **otel.engine_kw,
    )  # fmt: skip
    attempts = 0

    @sa.event.listens_for(client.engine, "do_connect")
    def heal_on_the_fourth_attempt(*args: Any) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 4:
            fault_proxy.healthy()

    fault_proxy.refuse()
    assert await client.scalar() == 1
    refused = "ConnectionRefusedError" if flavour == "asyncpg" else "08001"
    metrics = otel.metrics()
    assert otel.value("fault_tolerant_pool.connect.attempts", metrics) == 4
    assert otel.value("fault_tolerant_pool.connect.failed_attempts", metrics) == 3
    failed = "fault_tolerant_pool.connect.failed_attempts"
    assert otel.value(failed, metrics, error__type=refused) == 3
    assert otel.value("db.client.connection.create_time", metrics) == 1
    assert otel.value("fault_tolerant_pool.connect.give_ups", metrics) == 0
    (span,) = otel.spans(CONNECT_SPAN)
    assert span.attributes is not None and span.attributes[ATTEMPT_COUNT] == 4
    assert span.attributes["server.port"] == fault_proxy.port
    events = [e for e in span.events if e.name == ATTEMPT_FAILED_EVENT]
    assert [e.attributes["error.type"] for e in events if e.attributes] == [refused] * 3
    assert span.status.status_code is StatusCode.UNSET
    stats = client.stats()
    assert (stats.attempts, stats.failed_attempts, stats.connects) == (4, 3, 1)
    await client.dispose()
    otel.shutdown()


@flavours
async def test_waits_and_pool_timeouts(pg_server_session: PostgresServer, flavour: str) -> None:
    otel = Otel()
    client = Client(
        pg_server_session.url(flavour), flavour, poolclass=FaultTolerantQueuePool, pool_size=1,
        max_overflow=0, pool_timeout=0.3, **otel.engine_kw,
    )  # fmt: skip
    held = await checkout(client)
    otel.clear_spans()

    async def release_soon() -> None:
        await asyncio.sleep(0.15)
        assert otel.value("db.client.connection.pending_requests") == 1  # the waiter
        await checkin(client, held)

    async def checkout_in_a_request() -> Any:
        with otel.tracer.start_as_current_span("request"):  # a traced request of the app
            return await checkout(client)

    waiter = asyncio.ensure_future(checkout_in_a_request())
    await asyncio.gather(release_soon(), waiter)
    (waited,) = otel.spans(CHECKOUT_SPAN)
    attributes = waited.attributes or {}
    assert (attributes[CHECKOUT_WAITED], attributes[CHECKOUT_CONNECTED]) == (True, False)
    assert waited.status.status_code is StatusCode.UNSET
    assert waited.end_time is not None and waited.start_time is not None
    assert (waited.end_time - waited.start_time) / 1e9 >= 0.1
    assert otel.spans(CONNECT_SPAN) == []  # it got the returned connection

    # The same wait outside any request of the app: measured, but no lonely root span.
    otel.clear_spans()
    waits_before = otel.value("db.client.connection.wait_time")
    untraced = asyncio.ensure_future(checkout(client))
    await asyncio.sleep(0.15)
    await checkin(client, waiter.result())
    held = await untraced
    assert otel.spans(CHECKOUT_SPAN) == []
    assert otel.value("db.client.connection.wait_time") == waits_before + 1

    otel.clear_spans()
    started = time.monotonic()
    with pytest.raises(sa.exc.TimeoutError):
        await checkout(client)
    assert time.monotonic() - started >= 0.3
    metrics = otel.metrics()
    assert otel.value("db.client.connection.timeouts", metrics) == 1
    assert otel.value("db.client.connection.pending_requests", metrics) == 0
    (timed_out,) = otel.spans(CHECKOUT_SPAN)
    assert timed_out.status.status_code is StatusCode.ERROR
    assert (timed_out.attributes or {})["error.type"] == "TimeoutError"
    if client.async_engine is not None:  # a waiter cancelled: no pending request left behind
        otel.clear_spans()
        cancelled = asyncio.ensure_future(checkout(client))
        await asyncio.sleep(0.1)
        assert otel.value("db.client.connection.pending_requests") == 1
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert otel.value("db.client.connection.pending_requests") == 0
        (span,) = otel.spans(CHECKOUT_SPAN)
        assert (span.attributes or {})["error.type"] == "CancelledError"
    await checkin(client, held)
    await client.dispose()
    otel.shutdown()


@flavours
async def test_a_reconnect_after_a_failed_pre_ping_is_traced(
    pg_server: PostgresServer, flavour: str
) -> None:
    otel = Otel()
    client = Client(pg_server.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
                    pool_pre_ping=True, **otel.engine_kw)  # fmt: skip
    assert await client.scalar() == 1
    assert pg_server.terminate_backends() == 1
    otel.clear_spans()
    assert await client.scalar() == 1  # the pooled connection is dead: pre-ping, reconnect
    (checkout_span,) = otel.spans(CHECKOUT_SPAN)
    (connect_span,) = otel.spans(CONNECT_SPAN)
    attributes = checkout_span.attributes or {}
    assert (attributes[CHECKOUT_WAITED], attributes[CHECKOUT_CONNECTED]) == (False, True)
    assert parent_of(connect_span, otel.spans()) is checkout_span
    assert otel.value("db.client.connection.create_time") == 2
    await client.dispose()
    otel.shutdown()


@async_flavours
@pools
async def test_inside_an_app_span_the_connect_span_is_its_child(
    pg_server_session: PostgresServer, flavour: str, poolclass: type
) -> None:
    otel = Otel()
    client = Client(pg_server_session.url(flavour), flavour, poolclass=poolclass, **otel.engine_kw)

    async def request(n: int) -> None:
        with otel.tracer.start_as_current_span(f"request {n}"):
            await client.scalar()

    await asyncio.gather(*(request(n) for n in range(3)))  # concurrent tasks, one context each
    spans = otel.spans()
    checkouts = otel.spans(CHECKOUT_SPAN)
    assert len(checkouts) == 3
    for n in range(3):
        (app,) = otel.spans(f"request {n}")
        (checkout_span,) = [s for s in checkouts if parent_of(s, spans) is app]
        connects = otel.spans(CONNECT_SPAN)
        (connect_span,) = [s for s in connects if parent_of(s, spans) is checkout_span]
        assert connect_span.context.trace_id == app.context.trace_id
    await client.dispose()
    otel.shutdown()  # fmt: skip


@pools
def test_sync_code_nests_too(pg_server_session: PostgresServer, poolclass: type) -> None:
    otel = Otel()
    engine = sa.create_engine(
        pg_server_session.url("psycopg"), poolclass=poolclass, **otel.engine_kw
    )
    with otel.tracer.start_as_current_span("job"), engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    spans = otel.spans()
    (job,), (checkout_span,), (connect_span,) = (
        otel.spans("job"), otel.spans(CHECKOUT_SPAN), otel.spans(CONNECT_SPAN),
    )  # fmt: skip
    assert parent_of(checkout_span, spans) is job
    assert parent_of(connect_span, spans) is checkout_span
    engine.dispose()
    otel.shutdown()


@pytest.mark.parametrize("flavour", ["asyncpg", "psycopg"])
async def test_side_by_side_with_opentelemetry_instrumentation_sqlalchemy(
    pg_server_session: PostgresServer, flavour: str
) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    otel = Otel()
    client = Client(pg_server_session.url(flavour), flavour, poolclass=FaultTolerantQueuePool,
                    **otel.engine_kw)  # fmt: skip
    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(
        engine=client.engine, tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        skip_dep_check=True,  # it declares SQLAlchemy < 2.1 and works with 2.1
    )  # fmt: skip
    try:
        for _ in range(3):
            assert await client.scalar("SELECT 1") == 1
    finally:
        instrumentor.uninstrument()
    spans = otel.spans()
    statements = [s for s in spans if "SELECT" in s.name]
    assert len(statements) == 3  # theirs, once each: this pool adds no statement span
    assert all(s.attributes and "1" in str(s.attributes.get("db.statement")) for s in statements)
    (connect_span,) = otel.spans(CONNECT_SPAN)
    (checkout_span,) = otel.spans(CHECKOUT_SPAN)
    theirs = parent_of(checkout_span, spans)
    assert theirs is not None and theirs.name == "connect"  # their Engine.connect span
    assert parent_of(connect_span, spans) is checkout_span
    metrics = otel.metrics()
    assert otel.value("db.client.connection.wait_time", metrics) == 3
    assert "db.client.connections.usage" in metrics  # theirs, under its own (deprecated) name
    await client.dispose()
    otel.shutdown()


@flavours
async def test_no_password_anywhere(pg_server: PostgresServer, flavour: str) -> None:
    secret = "s3cr3t-pw-xyzzy"
    pg_server.create_role("app", password=secret)
    otel = Otel()
    good = Client(pg_server.url(flavour, user="app", password=secret), flavour,
                  poolclass=FaultTolerantNullPool, retry_deadline=0.5, **otel.engine_kw)
    wrong = Client(pg_server.url(flavour, user="app", password=secret + "-wrong"), flavour,
                   poolclass=FaultTolerantQueuePool, retry_deadline=0.5, **otel.engine_kw)
    assert await good.scalar() == 1
    # OperationalError; on SQLAlchemy 2.0 asyncpg's own InvalidPasswordError gets through.
    with pytest.raises(Exception, match="password authentication failed"):
        await wrong.scalar()
    pg_server.stop()
    with pytest.raises(sa.exc.OperationalError):
        await good.scalar()  # refused until the deadline: several attempt events
    connects = otel.spans(CONNECT_SPAN)
    assert len(connects) == 3
    assert [(s.attributes or {}).get("error.type") for s in connects] == [
        None, "28P01", "ConnectionRefusedError" if flavour == "asyncpg" else "08001"
    ]
    strings = list(otel.strings())
    assert any("password authentication failed" in s for s in strings)
    assert not [s for s in strings if secret in s or "://" in s]
    await good.dispose()
    await wrong.dispose()
    otel.shutdown()  # fmt: skip


def test_the_global_providers_are_the_default(pg_server_session: PostgresServer) -> None:
    """No provider passed: the application's global ones (set before or after the engine)."""
    script = textwrap.dedent(
        f"""
        import sqlalchemy as sa
        from opentelemetry import metrics, trace
        from fault_tolerant_pool import FaultTolerantQueuePool
        from tests.otel import Otel

        engine = sa.create_engine({pg_server_session.url("psycopg")!r},
                                  poolclass=FaultTolerantQueuePool)
        otel = Otel()
        trace.set_tracer_provider(otel.tracer_provider)
        metrics.set_meter_provider(otel.meter_provider)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert [s.name for s in otel.spans()] == [
            "fault_tolerant_pool.connect", "fault_tolerant_pool.checkout"
        ], otel.spans()
        metrics = otel.metrics()
        assert otel.value("db.client.connection.use_time", metrics) == 1
        assert otel.value("db.client.connection.idle.max", metrics) == 15
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.stdout.strip() == "ok", result.stderr

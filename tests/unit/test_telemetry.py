"""Telemetry without a database: endpoint and pool name, arguments, the connect span and metrics.

The connect loop runs with a fake creator, clock and sleep (no sleeping); the SDK's in-memory
exporter and reader receive what the telemetry emits.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.endpoint import Endpoint, endpoint_of
from fault_tolerant_pool.errors import ConnectRetriesExhausted
from fault_tolerant_pool.notes import ConnectionNotes
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.telemetry import (
    ATTEMPT_BACKOFF,
    ATTEMPT_COUNT,
    ATTEMPT_FAILED_EVENT,
    ATTEMPT_NUMBER,
    CONNECT_SPAN,
    PoolTelemetry,
)
from tests.otel import Otel

from .test_connector import Clock, FakeDBAPI, flaky, refused

POOLS = [FaultTolerantQueuePool, FaultTolerantNullPool]
pools = pytest.mark.parametrize("poolclass", POOLS, ids=lambda p: p.__name__)


def telemetry_of(engine: Any) -> PoolTelemetry:
    engine = getattr(engine, "sync_engine", engine)
    telemetry: PoolTelemetry = engine.pool._telemetry
    return telemetry


# -- where the pool connects, and its name -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://u:pw@db.example:6543/app", Endpoint("db.example", 6543, "app")),
        ("postgresql+psycopg://u:pw@db.example:6543/app", Endpoint("db.example", 6543, "app")),
        ("postgresql+psycopg_async://u:pw@db.example/app", Endpoint("db.example", 5432, "app")),
        ("postgresql+asyncpg://u:pw@/app?host=h1:5433&host=h2:5434", Endpoint("h1", 5433, "app")),
        ("postgresql+psycopg://u:pw@/app?host=h1,h2&port=5433,5434", Endpoint("h1", 5433, "app")),
        ("postgresql+psycopg://u:pw@/app?host=/run/pg", Endpoint("/run/pg", 5432, "app")),
    ],
)  # fmt: skip
@pools
def test_the_endpoint_comes_from_the_engine_url(
    url: str, expected: Endpoint, poolclass: type
) -> None:
    engine: Any = (
        create_async_engine(url, poolclass=poolclass)
        if "async" in url
        else sa.create_engine(url, poolclass=poolclass)
    )
    telemetry = telemetry_of(engine)
    assert telemetry.endpoint == expected
    assert telemetry.pool_name == f"{expected.address}:{expected.port}/{expected.namespace}"
    assert telemetry.span_attributes == {
        "db.system.name": "postgresql",
        "server.address": expected.address,
        "server.port": expected.port,
        "db.namespace": expected.namespace,
        "db.client.connection.pool.name": telemetry.pool_name,
    }
    assert "pw" not in repr(telemetry.span_attributes) and "u:" not in telemetry.pool_name


def test_endpoint_of_keeps_only_host_port_and_database() -> None:
    assert endpoint_of(None) == Endpoint()
    assert endpoint_of({"password": "pw", "user": "u"}) == Endpoint(None, 5432, None)
    assert endpoint_of({"host": "h", "port": "x"}) == Endpoint("h", None, None)
    assert Endpoint().attributes() == {}


@pools
def test_the_pool_name_can_be_set(poolclass: type) -> None:
    engine = sa.create_engine(
        "postgresql+psycopg://u:pw@db/app", poolclass=poolclass, pool_name="orders-primary"
    )
    telemetry = telemetry_of(engine)
    assert telemetry.pool_name == "orders-primary"
    assert telemetry.span_attributes["server.address"] == "db"  # still the real server
    config = {
        "sqlalchemy.url": "postgresql+psycopg://u:pw@db/app",
        "sqlalchemy.poolclass": poolclass,
        "sqlalchemy.pool_name": " reports ",
    }
    assert telemetry_of(sa.engine_from_config(config)).pool_name == "reports"


@pools
def test_a_creator_of_the_application_gives_no_server_attributes(poolclass: type) -> None:
    engine = sa.create_engine("postgresql+psycopg://", poolclass=poolclass, creator=lambda: None)
    telemetry = telemetry_of(engine)
    assert telemetry.pool_name == "postgresql"
    assert telemetry.span_attributes == {
        "db.system.name": "postgresql",
        "db.client.connection.pool.name": "postgresql",
    }


@pools
@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"pool_name": ""}, "pool_name"),
        ({"pool_name": 3}, "pool_name"),
        ({"tracer_provider": "opentelemetry"}, "tracer_provider"),
        ({"meter_provider": object()}, "meter_provider"),
    ],
)
def test_bad_telemetry_arguments_are_refused_at_engine_creation(
    poolclass: type, kw: dict[str, Any], named: str
) -> None:
    with pytest.raises(ArgumentError, match=named):
        sa.create_engine("postgresql+psycopg://u:pw@db/app", poolclass=poolclass, **kw)


@pools
def test_the_telemetry_survives_dispose(poolclass: type) -> None:
    otel = Otel()
    engine = sa.create_engine(
        "postgresql+psycopg://u:pw@db/app", poolclass=poolclass, pool_name="p", **otel.engine_kw
    )
    before = telemetry_of(engine)
    engine.dispose()
    after = telemetry_of(engine)
    assert after is before and after.pool() is engine.pool  # the gauges read the new pool
    metrics = otel.metrics()
    used = otel.value("db.client.connection.count", metrics, db__client__connection__state="used")
    assert used == 0
    idle_max = otel.value("db.client.connection.idle.max", metrics)
    # overflow connections are kept idle: pool_size 5 + max_overflow 10
    assert idle_max == (15 if poolclass is FaultTolerantQueuePool else 0)
    otel.shutdown()


# -- the connect span and the connect metrics ----------------------------------------------------


def connector(creator: Any, clock: Clock, telemetry: PoolTelemetry, **policy: Any) -> Any:
    return RetryingConnector(
        creator,
        RetryPolicy(**policy),
        ConnectCounters(),
        sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
        telemetry=telemetry,
    )


def pool_telemetry(otel: Otel) -> PoolTelemetry:
    return PoolTelemetry(endpoint=Endpoint("db", 5432, "app"), **otel.engine_kw)


def test_three_refused_attempts_then_a_success() -> None:
    otel, clock = Otel(), Clock()
    connect = connector(flaky([refused()] * 3, clock), clock, pool_telemetry(otel))
    assert connect(None) == "connection"
    (span,) = otel.spans()
    assert (span.name, span.kind, span.status.status_code) == (
        CONNECT_SPAN, SpanKind.CLIENT, StatusCode.UNSET,
    )  # fmt: skip
    assert span.attributes is not None and span.attributes[ATTEMPT_COUNT] == 4
    events = [e for e in span.events if e.name == ATTEMPT_FAILED_EVENT]
    assert [e.attributes[ATTEMPT_NUMBER] for e in events if e.attributes] == [1, 2, 3]
    assert [e.attributes[ATTEMPT_BACKOFF] for e in events if e.attributes] == pytest.approx(
        clock.sleeps
    )
    assert all(e.attributes and e.attributes["error.type"] == "ConnectionRefusedError"
               for e in events)  # fmt: skip
    metrics = otel.metrics()
    name = {"db__client__connection__pool__name": "db:5432/app"}
    assert otel.value("fault_tolerant_pool.connect.attempts", metrics, **name) == 4
    assert otel.value(
        "fault_tolerant_pool.connect.failed_attempts", metrics, error__type="ConnectionRefusedError"
    ) == 3  # fmt: skip
    assert otel.value("db.client.connection.create_time", metrics, **name) == 1
    assert otel.value("fault_tolerant_pool.connect.give_ups", metrics) == 0
    (point,) = metrics["db.client.connection.create_time"].data.data_points
    assert point.sum == pytest.approx(sum(clock.sleeps) + 4 * 0.001)  # time to the connection
    otel.shutdown()


def test_a_give_up_sets_the_error_status_and_type() -> None:
    otel, clock = Otel(), Clock()
    connect = connector(flaky([refused()] * 10, clock), clock, pool_telemetry(otel), attempts=3)
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ConnectionRefusedError"
    assert span.attributes[ATTEMPT_COUNT] == 3
    last = span.events[-1].attributes
    assert last is not None and ATTEMPT_BACKOFF not in last  # no sleep after the last attempt
    metrics = otel.metrics()
    give_ups = "fault_tolerant_pool.connect.give_ups"
    assert otel.value(give_ups, metrics, error__type="ConnectionRefusedError") == 1
    assert otel.value("db.client.connection.create_time", metrics) == 0
    otel.shutdown()


def test_error_type_is_the_sqlstate_where_there_is_one() -> None:
    otel, clock = Otel(), Clock()
    auth = FakeDBAPI.OperationalError('password authentication failed for "app" password=hunter2')
    auth.sqlstate = "28P01"
    connect = connector(flaky([auth], clock), clock, pool_telemetry(otel))
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)
    (span,) = otel.spans()
    assert span.attributes is not None and span.attributes["error.type"] == "28P01"
    event = span.events[0].attributes
    assert event is not None and event["exception.type"] == "OperationalError"
    assert "password authentication failed" in str(event["exception.message"])
    assert "hunter2" not in " ".join(otel.strings())
    otel.shutdown()


def test_a_cancelled_connect_still_ends_its_span() -> None:
    otel, clock = Otel(), Clock()

    def cancelled_sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    connect = RetryingConnector(
        flaky([refused()] * 3, clock), RetryPolicy(), ConnectCounters(), sleep=cancelled_sleep,
        dbapi=lambda: FakeDBAPI, clock=clock, random=lambda: 0.5, telemetry=pool_telemetry(otel),
    )  # fmt: skip
    with pytest.raises(asyncio.CancelledError):
        connect(None)
    (span,) = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "CancelledError"
    otel.shutdown()


def test_without_an_sdk_the_spans_do_not_record() -> None:
    telemetry = PoolTelemetry(endpoint=Endpoint("db", 5432, "app"))  # the global no-op proxies
    with telemetry.connect() as trace:
        assert not trace._span.is_recording()
        trace.connected(0.01)


# -- the extension metrics for credentials and retirements ---------------------------------------


def test_credential_refreshes_and_retirements() -> None:
    otel = Otel()
    telemetry = pool_telemetry(otel)
    telemetry.credentials_refreshed()
    telemetry.credentials_refreshed()
    for reason in ("lifetime", "lifetime", "idle", "liveness"):
        telemetry.retired(reason)
    with pytest.raises(ValueError, match="reason"):
        telemetry.retired("boredom")
    metrics = otel.metrics()
    assert otel.value("fault_tolerant_pool.credential.refreshes", metrics) == 2
    retirements = "fault_tolerant_pool.connection.retirements"
    by_reason = {
        reason: otel.value(retirements, metrics, fault_tolerant_pool__retirement__reason=reason)
        for reason in ("lifetime", "idle", "liveness")
    }
    assert by_reason == {"lifetime": 2, "idle": 1, "liveness": 1}
    for name in ("fault_tolerant_pool.credential.refreshes", retirements):
        assert (Otel.kind(metrics[name]), metrics[name].unit) == (
            "counter", "{refresh}" if "refresh" in name else "{connection}",
        )  # fmt: skip
    otel.shutdown()


def test_pools_sharing_a_meter_provider_are_all_reported() -> None:
    otel = Otel()
    url = "postgresql+psycopg://u:pw@db/app"
    engines = [
        sa.create_engine(url, poolclass=FaultTolerantQueuePool, pool_name="a", **otel.engine_kw),
        sa.create_engine(url, poolclass=FaultTolerantQueuePool, pool_name="b", pool_size=7,
                         **otel.engine_kw),
        sa.create_engine(url, poolclass=FaultTolerantQueuePool, pool_name="b", pool_size=2,
                         **otel.engine_kw),
    ]  # fmt: skip
    metrics = otel.metrics()
    idle_max = "db.client.connection.idle.max"
    # idle overflow is kept (pool_size + max_overflow of 10)
    assert otel.value(idle_max, metrics, db__client__connection__pool__name="a") == 15
    assert otel.value(idle_max, metrics, db__client__connection__pool__name="b") == 29  # summed
    del engines
    otel.shutdown()


def test_no_max_is_reported_for_an_unbounded_pool() -> None:
    otel = Otel()
    url = "postgresql+psycopg://u:pw@db/app"
    engine = sa.create_engine(
        url, poolclass=FaultTolerantQueuePool, max_overflow=-1, pool_size=3, **otel.engine_kw,
    )  # fmt: skip
    metrics = otel.metrics()
    assert "db.client.connection.max" not in metrics
    assert "db.client.connection.idle.max" not in metrics  # idle overflow is kept, unbounded
    engine.dispose()
    del engine
    stock_rule = sa.create_engine(
        url, poolclass=FaultTolerantQueuePool, max_overflow=-1, pool_size=3, overflow_idle=0,
        **otel.engine_kw,
    )  # fmt: skip
    metrics = otel.metrics()
    assert "db.client.connection.max" not in metrics
    assert otel.value("db.client.connection.idle.max", metrics) == 3  # SQLAlchemy's rule
    stock_rule.dispose()
    otel.shutdown()


def test_checkouts_are_measured_only_once_a_provider_listens() -> None:
    """API alone: checkouts skip their measurements; a global SDK set later switches them on.

    Run in a fresh interpreter: the global providers can be set once per process.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sqlalchemy as sa
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from fault_tolerant_pool import FaultTolerantQueuePool

        engine = sa.create_engine(
            "postgresql+psycopg://u:pw@127.0.0.1:1/db", poolclass=FaultTolerantQueuePool
        )
        telemetry = engine.pool._telemetry
        assert not telemetry.active(), "API only: nothing listens"
        trace.set_tracer_provider(TracerProvider())
        assert telemetry.active(), "a global tracer provider was set"
        explicit = sa.create_engine(
            "postgresql+psycopg://u:pw@127.0.0.1:1/db", poolclass=FaultTolerantQueuePool,
            meter_provider=MeterProvider(),
        )
        assert explicit.pool._telemetry._measuring
        noop = sa.create_engine(
            "postgresql+psycopg://u:pw@127.0.0.1:1/db", poolclass=FaultTolerantQueuePool,
            meter_provider=metrics.NoOpMeterProvider(),
        )
        assert not noop.pool._telemetry._measuring
        # spans only (a tracer provider, no meter provider): no histogram value is queued
        spans_only = sa.create_engine(
            "postgresql+psycopg://u:pw@127.0.0.1:1/db", poolclass=FaultTolerantQueuePool,
            tracer_provider=TracerProvider(), meter_provider=metrics.NoOpMeterProvider(),
        )
        queue = spans_only.pool._telemetry._instruments.deferred
        class Proxied:
            _connection_record = type("Record", (), {})()
        t = spans_only.pool._telemetry
        t.checked_out(t.checkout_started(False), Proxied())
        assert t.active() and len(queue) == 0 and not Proxied._connection_record.__dict__
        assert not telemetry._values_kept(), "the global meter provider is not set yet"
        metrics.set_meter_provider(MeterProvider())
        assert telemetry._values_kept(), "a global meter provider was set"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- the checkout histograms: queued, handed to the SDK in batches and at every collection ------


class _Record:
    """Stands in for the pool's connection record (the telemetry only uses its notes)."""

    def __init__(self) -> None:
        self.notes = ConnectionNotes()


class _Proxied:
    def __init__(self) -> None:
        self._connection_record = _Record()


def _checkout_and_checkin(telemetry: PoolTelemetry) -> None:
    connection = _Proxied()
    telemetry.checked_out(telemetry.checkout_started(waits=False), connection)
    telemetry.checked_in(connection._connection_record)


def test_histogram_values_are_queued_then_recorded_in_a_batch() -> None:
    from fault_tolerant_pool.telemetry import FLUSH_EVERY, USE_TIME, WAIT_TIME

    otel = Otel()
    telemetry = pool_telemetry(otel)
    deferred = telemetry._instruments.deferred
    checkouts = FLUSH_EVERY // 2 - 1  # two values each: one short of a batch
    for _ in range(checkouts):
        _checkout_and_checkin(telemetry)
    assert len(deferred) == 2 * checkouts, "below the batch size nothing reaches the SDK yet"
    _checkout_and_checkin(telemetry)  # the value that fills the batch hands it over
    assert len(deferred) == 0
    # ... and a collection hands over whatever is queued: nothing is lost or counted twice
    _checkout_and_checkin(telemetry)
    assert len(deferred) == 2
    metrics = otel.metrics()
    assert len(deferred) == 0
    assert otel.value(WAIT_TIME, metrics) == checkouts + 2
    assert otel.value(USE_TIME, metrics) == checkouts + 2
    assert telemetry.pending == 0
    otel.shutdown()


def test_a_queued_value_keeps_the_trace_it_was_measured_in() -> None:
    """Exemplars still point at the request's trace although the record happens later."""
    from fault_tolerant_pool.telemetry import WAIT_TIME

    otel = Otel()
    telemetry = pool_telemetry(otel)
    with otel.tracer.start_as_current_span("request") as request:
        _checkout_and_checkin(telemetry)
    _checkout_and_checkin(telemetry)  # outside any span: no exemplar
    (point,) = otel.metrics()[WAIT_TIME].data.data_points
    assert point.count == 2
    assert [e.trace_id for e in point.exemplars] == [request.get_span_context().trace_id]
    otel.shutdown()


def test_threads_queueing_and_flushing_at_once_record_every_value_once() -> None:
    import threading

    from fault_tolerant_pool.telemetry import USE_TIME, WAIT_TIME

    otel = Otel()
    telemetry = pool_telemetry(otel)
    per_thread, threads = 500, 4
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            _checkout_and_checkin(telemetry)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(worker.is_alive() for worker in workers):
        otel.metrics()  # collections flush while the threads queue and flush
    for worker in workers:
        worker.join()
    metrics = otel.metrics()
    assert otel.value(WAIT_TIME, metrics) == per_thread * threads
    assert otel.value(USE_TIME, metrics) == per_thread * threads
    assert telemetry.pending == 0
    otel.shutdown()


def test_the_connect_state_fast_failures_and_outages_are_metrics() -> None:
    from fault_tolerant_pool.probe import Admission, Gate

    otel = Otel()
    telemetry = pool_telemetry(otel)
    clock = Clock()
    gate = Gate(10.0, clock=clock, random=lambda: 0.5)
    gate.listener = telemetry
    telemetry.connect_figures = gate.figures
    assert gate.enter(clock.now + 10, False) is Admission.GO
    gate.finished(clock.now, refused(), clock.now)
    clock.now += 10.0
    assert gate.enter(clock.now + 10, False) is Admission.GO  # the probe, in flight
    assert gate.enter(clock.now + 10, False) is Admission.FAIL_FAST
    gate.count_fast_failure()
    metrics = otel.metrics()
    state = "fault_tolerant_pool.connect.state"
    states = {
        s: otel.value(state, metrics, fault_tolerant_pool__connect__state=s)
        for s in ("healthy", "failing", "failing_fast", "recovering")
    }
    assert states == {"healthy": 0, "failing": 0, "failing_fast": 1, "recovering": 0}
    assert otel.value("fault_tolerant_pool.connect.fast_failures", metrics) == 1
    assert otel.value("fault_tolerant_pool.checkout.rejected", metrics) == 0
    assert otel.value("fault_tolerant_pool.connect.waiting", metrics) == 0
    clock.now += 2.5
    gate.finished(clock.now, None, clock.now)  # the probe connected: the outage ended
    metrics = otel.metrics()
    (point,) = metrics["fault_tolerant_pool.connect.outage.duration"].data.data_points
    assert (point.count, point.sum) == (1, pytest.approx(12.5))
    assert otel.value(state, metrics, fault_tolerant_pool__connect__state="healthy") == 1
    otel.shutdown()

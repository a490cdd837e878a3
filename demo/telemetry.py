"""Metrics and traces of the demo.

- ``/metrics`` is Prometheus text from two sources: the global OpenTelemetry ``MeterProvider``
  (installed by :func:`install` with the Prometheus reader, so every OpenTelemetry metric in the
  process, the pool's own ``db.client.connection.*`` included once the pool records them, shows
  up there), :class:`PoolCollector`, which turns ``engine.pool.stats()`` into counters and
  gauges at scrape time, and :class:`ReadsCollector`, where the reads went (per reader by port).
- Traces go over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: one server span per
  request (:class:`RequestObserver`) and one client span per database operation (:func:`db_span`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fault_tolerant_pool import PoolStats

from .settings import Settings

log = logging.getLogger("demo.telemetry")

_tracer = trace.get_tracer("demo")
_meter = metrics.get_meter("demo")
_request_duration = _meter.create_histogram(
    "http.server.request.duration",
    unit="s",
    description="Duration of HTTP server requests",
)


# --------------------------------------------------------------------------------------------------
# Process-wide providers.


@dataclass
class Telemetry:
    """What :func:`install` set up; :meth:`shutdown` flushes pending spans."""

    meter_provider: Any = None
    tracer_provider: Any = None

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                with contextlib.suppress(Exception):
                    provider.shutdown()


_installed: Telemetry | None = None
_install_lock = threading.Lock()


def install(settings: Settings) -> Telemetry:
    """Install the global meter provider (Prometheus reader) and, with an OTLP endpoint, tracing.

    Once per process; later calls return the first result. A provider someone else installed
    first is left alone.
    """
    global _installed
    with _install_lock:
        if _installed is not None:
            return _installed
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create({"service.name": settings.service_name})
        telemetry = Telemetry()
        if isinstance(metrics.get_meter_provider(), metrics.NoOpMeterProvider) or _is_proxy(
            metrics.get_meter_provider()
        ):
            telemetry.meter_provider = MeterProvider(
                resource=resource, metric_readers=[PrometheusMetricReader()]
            )
            metrics.set_meter_provider(telemetry.meter_provider)
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT (and _TRACES_ENDPOINT, headers...)
            # itself and appends /v1/traces.
            telemetry.tracer_provider = TracerProvider(resource=resource)
            telemetry.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(telemetry.tracer_provider)
        _installed = telemetry
        return telemetry


def _is_proxy(provider: object) -> bool:
    return type(provider).__name__.startswith("_Proxy")


# --------------------------------------------------------------------------------------------------
# Requests: counters for the page, a span and a duration for OpenTelemetry.

#: Paths whose requests use the database; their outcomes are what the page and the tests count.
DATABASE_PATHS = ("/pg_version", "/notes")


class RequestCounters:
    """Outcomes of the database-backed requests, and the slowest one since the last sample."""

    __slots__ = ("_lock", "errors", "in_flight", "ok", "slowest", "unavailable")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok = 0
        self.unavailable = 0
        self.errors = 0
        self.in_flight = 0
        self.slowest = 0.0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            if status < 400:
                self.ok += 1
            elif status == 503:
                self.unavailable += 1
            elif status >= 500:
                self.errors += 1
            self.slowest = max(self.slowest, seconds)

    def take_slowest(self) -> float:
        """The slowest finished request since the previous call."""
        with self._lock:
            slowest, self.slowest = self.slowest, 0.0
            return slowest

    def as_dict(self) -> dict[str, int]:
        return {
            "ok": self.ok,
            "unavailable": self.unavailable,
            "errors": self.errors,
            "in_flight": self.in_flight,
        }


def _header_getter(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}


class RequestObserver:
    """ASGI middleware: a server span and a duration per request; counts database requests."""

    def __init__(self, app: ASGIApp, counters: RequestCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        counted = path.startswith(DATABASE_PATHS)
        status = 500
        started = time.perf_counter()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        context = propagate.extract(_header_getter(scope))
        if counted:
            self.counters.started()
        with _tracer.start_as_current_span(
            f"{method} {path}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            try:
                await self.app(scope, receive, send_observed)
            finally:
                elapsed = time.perf_counter() - started
                route = _route_of(scope) or path
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status))
                _request_duration.record(
                    elapsed,
                    {
                        "http.request.method": method,
                        "http.route": route,
                        "http.response.status_code": status,
                    },
                )
                if counted:
                    self.counters.finished(status, elapsed)


def _route_of(scope: Scope) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


@contextlib.contextmanager
def db_span(operation: str, table: str | None, server: Mapping[str, Any]) -> Iterator[None]:
    """A client span around one database operation (including the checkout and any retry)."""
    name = f"{operation} {table}" if table else operation
    attributes = {"db.system.name": "postgresql", "db.operation.name": operation, **server}
    if table:
        attributes["db.collection.name"] = table
    with _tracer.start_as_current_span(
        name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
    ) as span:
        try:
            yield
        except BaseException as exc:
            orig = getattr(exc, "orig", None)
            sqlstate = getattr(orig, "sqlstate", None) or getattr(exc, "sqlstate", None)
            span.set_attribute("error.type", sqlstate or type(orig or exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
            raise


# --------------------------------------------------------------------------------------------------
# Prometheus.


class PoolCollector(Collector):
    """The pool's own counters (``engine.pool.stats()``) and the demo's request counts."""

    def __init__(
        self,
        stats: Callable[[], PoolStats | None],
        requests: RequestCounters,
        pool_name: str,
    ) -> None:
        self._stats = stats
        self._requests = requests
        self._pool = pool_name

    def collect(self) -> Iterable[Metric]:
        labels = ["pool"]
        requests = GaugeMetricFamily(
            "demo_requests_in_flight", "Database-backed requests being served", labels=labels
        )
        requests.add_metric([self._pool], self._requests.in_flight)
        yield requests
        outcomes = CounterMetricFamily(
            "demo_requests",
            "Database-backed requests by outcome (ok, unavailable = 503, error = other 5xx)",
            labels=[*labels, "outcome"],
        )
        for outcome, value in (
            ("ok", self._requests.ok),
            ("unavailable", self._requests.unavailable),
            ("error", self._requests.errors),
        ):
            outcomes.add_metric([self._pool, outcome], value)
        yield outcomes
        stats = self._stats()
        if stats is None:
            return
        connections = GaugeMetricFamily(
            "demo_pool_connections",
            "Connections of the pool by state (idle in the pool, used by the application)",
            labels=[*labels, "state"],
        )
        connections.add_metric([self._pool, "idle"], stats.checked_in)
        connections.add_metric([self._pool, "used"], stats.checked_out)
        yield connections
        state = GaugeMetricFamily(
            "demo_pool_connect_state",
            "1 for the pool's connect state (healthy, failing, failing_fast, recovering)",
            labels=[*labels, "state"],
        )
        for name in ("healthy", "failing", "failing_fast", "recovering"):
            state.add_metric([self._pool, name], 1 if stats.connect_state == name else 0)
        yield state
        gauges: tuple[tuple[str, str, float], ...] = (
            ("demo_pool_size", "Configured pool_size (0 for a null pool)", stats.size),
            ("demo_pool_overflow", "Connections beyond pool_size", stats.overflow),
            ("demo_pool_oldest_checkout_age_seconds",
             "Seconds the oldest connection now checked out has been out",
             stats.oldest_checkout_age or 0.0),
        )  # fmt: skip
        for name, documentation, reading in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=labels)
            gauge.add_metric([self._pool], reading)
            yield gauge
        for name, documentation, value in (
            ("demo_pool_connects", "Physical connections made", stats.connects),
            ("demo_pool_connect_attempts", "Connect attempts", stats.attempts),
            ("demo_pool_connect_failures", "Failed connect attempts",
             stats.failed_attempts),
            ("demo_pool_connect_give_ups", "Connects that failed for good",
             stats.give_ups),
            ("demo_pool_leaks", "Checkouts reported as held longer than leak_threshold",
             stats.leaks),
            ("demo_pool_connect_fast_failures", "Connects refused at once while failing fast",
             stats.fast_failures),
            ("demo_pool_outages", "Outages that ended (connects succeeded again)",
             stats.outages),
            ("demo_pool_transaction_retries",
             "Units of work the transaction runner ran again on a fresh connection",
             stats.transaction_retries),
            ("demo_pool_outcomes_unknown",
             "Units of work whose COMMIT was cut in flight (outcome unknown)",
             stats.outcomes_unknown),
            ("demo_pool_outcomes_resolved",
             "Units of work whose COMMIT was cut in flight, settled by asking the server",
             stats.outcomes_resolved),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, documentation, labels=labels)
            counter.add_metric([self._pool], value)
            yield counter
        if stats.last_error is not None:
            last = GaugeMetricFamily(
                "demo_pool_last_connect_error_timestamp_seconds",
                "When the latest connect attempt failed, with its error class and SQLSTATE",
                labels=[*labels, "error_class", "sqlstate"],
            )
            error = stats.last_error
            last.add_metric([self._pool, error.error_class, error.sqlstate or ""], error.at)
            yield last


class ReadsCollector(Collector):
    """The demo's reads (``/health``'s ``reads``, so that both say the same): per reader by name
    and port, and the writer's share by route and reason. Nothing without read replicas."""

    def __init__(self, reads: Callable[[], Mapping[str, Any]], pool_name: str) -> None:
        self._reads = reads
        self._pool = pool_name

    def collect(self) -> Iterable[Metric]:
        reads = self._reads()
        if not reads.get("routed"):
            return
        server = ["pool", "server", "port"]
        routed = CounterMetricFamily(
            "demo_reads",
            "Reads routed by the ReplicaRouter: to a reader, or to the writer (fallback: no "
            "reader in rotation; read_your_writes: the request had just written)",
            labels=[*server, "route"],
        )
        rotation = GaugeMetricFamily(
            "demo_reads_in_rotation", "1 while the reader takes reads", labels=server
        )
        lag = GaugeMetricFamily(
            "demo_reads_replica_lag_seconds",
            "Seconds the reader was behind at the router's last check",
            labels=server,
        )
        for reader in reads["servers"]:
            labels = [self._pool, reader["name"], str(reader["port"] or "")]
            routed.add_metric([*labels, "reader"], reader["reads"])
            rotation.add_metric(labels, 1 if reader["in_rotation"] else 0)
            if reader["lag"] is not None:
                lag.add_metric(labels, reader["lag"])
        writer = reads["writer"]
        for route in ("fallback", "read_your_writes"):
            count = writer["fallbacks" if route == "fallback" else route]
            routed.add_metric([self._pool, "writer", "", route], count)
        yield from (routed, rotation, lag)
        reasons = CounterMetricFamily(
            "demo_reads_on_writer",
            "Reads the writer answered, by why (no_standby, standby_down, standby_behind, "
            "not_checked, read_your_writes, checkout_failed)",
            labels=["pool", "reason"],
        )
        for reason, count in sorted(writer["reasons"].items()):
            reasons.add_metric([self._pool, reason], count)
        yield reasons
        again = CounterMetricFamily(
            "demo_reads_run_again",
            "Reads the transaction runner ran again after a fault cut them",
            labels=["pool"],
        )
        again.add_metric([self._pool], reads["run_again"])
        yield again


def render_metrics(own: CollectorRegistry) -> bytes:
    """Prometheus text: the process registry (OpenTelemetry, process, GC) and ``own``."""
    return generate_latest(REGISTRY) + generate_latest(own)

"""OpenTelemetry for the pools: spans for connects and slow checkouts, the conventions' metrics.

- A span per physical connect (``fault_tolerant_pool.connect``, kind CLIENT) around the whole retry
  sequence; each failed attempt is an event on it (``fault_tolerant_pool.attempt.failed``).
- A span per checkout (``fault_tolerant_pool.checkout``) only when the caller waited for a slot or
  a connection was created for it; the connect span is then its child.
- The ``db.client.connection.*`` pool metrics of the semantic conventions, and the project's
  ``fault_tolerant_pool.*`` extension metrics (see docs/opentelemetry.md for the list).

Only opentelemetry-api is used: without an SDK every call lands on a no-op. The gauges (counts,
limits, pending requests) are observable instruments that read the pool when a reader collects.
A checkout's two histogram values (wait time, use time) are queued and handed to the SDK in
batches (see :class:`_Deferred`): the SDK's ``Histogram.record`` costs about 6 µs in a tight loop
and nearly twice that when called once between other work, which a saturated event loop feels.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from functools import lru_cache
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .classify import Verdict, classify, sqlstate_of
from .endpoint import Endpoint
from .errors import ConnectRetriesExhausted, one_line, redact

INSTRUMENTATION_NAME = "fault_tolerant_pool"

# -- names: the conventions' ----------------------------------------------------------------------

DB_SYSTEM_NAME = "db.system.name"
POOL_NAME = "db.client.connection.pool.name"
CONNECTION_STATE = "db.client.connection.state"
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"

CONNECTION_COUNT = "db.client.connection.count"
CONNECTION_MAX = "db.client.connection.max"
CONNECTION_IDLE_MAX = "db.client.connection.idle.max"
PENDING_REQUESTS = "db.client.connection.pending_requests"
TIMEOUTS = "db.client.connection.timeouts"
CREATE_TIME = "db.client.connection.create_time"
WAIT_TIME = "db.client.connection.wait_time"
USE_TIME = "db.client.connection.use_time"

# -- names: this project's (prefix ``fault_tolerant_pool.``) --------------------------------------

CONNECT_SPAN = "fault_tolerant_pool.connect"
CHECKOUT_SPAN = "fault_tolerant_pool.checkout"
ATTEMPT_FAILED_EVENT = "fault_tolerant_pool.attempt.failed"

ATTEMPT_COUNT = "fault_tolerant_pool.connect.attempt_count"
ATTEMPT_NUMBER = "fault_tolerant_pool.attempt.number"
ATTEMPT_DURATION = "fault_tolerant_pool.attempt.duration"
ATTEMPT_BACKOFF = "fault_tolerant_pool.attempt.backoff"
ATTEMPT_TRANSIENT = "fault_tolerant_pool.attempt.transient"
CHECKOUT_WAITED = "fault_tolerant_pool.checkout.waited"
CHECKOUT_CONNECTED = "fault_tolerant_pool.checkout.connected"
RETIREMENT_REASON = "fault_tolerant_pool.retirement.reason"

CONNECT_ATTEMPTS = "fault_tolerant_pool.connect.attempts"
CONNECT_FAILED_ATTEMPTS = "fault_tolerant_pool.connect.failed_attempts"
CONNECT_GIVE_UPS = "fault_tolerant_pool.connect.give_ups"
CREDENTIAL_REFRESHES = "fault_tolerant_pool.credential.refreshes"
RETIREMENTS = "fault_tolerant_pool.connection.retirements"
CONNECT_STATE = "fault_tolerant_pool.connect.state"
CONNECT_WAITING = "fault_tolerant_pool.connect.waiting"
FAST_FAILURES = "fault_tolerant_pool.connect.fast_failures"
REJECTED_WAITING = "fault_tolerant_pool.checkout.rejected"
OUTAGE_DURATION = "fault_tolerant_pool.connect.outage.duration"
#: The attribute of ``fault_tolerant_pool.connect.state`` (see :mod:`fault_tolerant_pool.probe`).
CONNECT_STATE_ATTRIBUTE = "fault_tolerant_pool.connect.state"
CONNECT_STATES = ("healthy", "failing", "failing_fast", "recovering")
LEAKS = "fault_tolerant_pool.connection.leaks"
LEAK_KIND = "fault_tolerant_pool.leak.kind"

#: Retirement reasons (the values of ``fault_tolerant_pool.retirement.reason``).
RETIREMENT_REASONS = ("lifetime", "idle", "liveness", "overflow", "drain")
#: Leak report kinds (the values of ``fault_tolerant_pool.leak.kind``).
LEAK_KINDS = ("held", "reclaimed", "shutdown")

#: Histogram buckets in seconds: from an instant checkout (0.1 ms) to a long retry sequence.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class PoolGauges(Protocol):
    """What the observable instruments read from a pool when a reader collects."""

    def _gauges(self) -> tuple[int, int, int, int]:
        """(size, checked in, checked out, overflow)."""

    def _limits(self) -> tuple[int | None, int | None]:
        """(most connections open at once, most idle connections kept); None: no limit."""


@lru_cache(maxsize=1)
def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fault_tolerant_pool")
    except Exception:
        return None


def verdict_error_type(verdict: Verdict) -> str:
    """``error.type`` of a failed attempt: the SQLSTATE where there is one, else the class name.

    For psycopg, which reports no SQLSTATE at connect time, it is the one its message stands for
    (``08001`` for a refused connection, ``28P01`` for a wrong password): see classify.py.
    """
    return verdict.sqlstate or verdict.error_type


def error_type(error: BaseException) -> str:
    """``error.type`` of what a caller got: a give-up is typed by its last failed attempt."""
    if isinstance(error, ConnectRetriesExhausted):
        return verdict_error_type(classify(error.last_error))
    return sqlstate_of(error) or type(error).__name__


# -- histogram values handed to the SDK in batches -------------------------------------------------


def _context_reader() -> Callable[[], otel_context.Context]:
    """The cheapest read of the current OpenTelemetry context (what ``get_current()`` returns).

    The API's default runtime context keeps it in one ``ContextVar``: reading that directly is
    one C call instead of two Python frames (a reference to an immutable context, no copy).
    Checked once at import; any other runtime context is read through the API.
    """
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if isinstance(variable, ContextVar) and variable.get() is otel_context.get_current():
        return variable.get
    return otel_context.get_current


_current_context = _context_reader()

#: How many queued histogram values make a checkout hand them to the SDK itself (about 16
#: checkouts' worth; the batch takes some 0.2 ms). A collection hands over whatever is queued.
FLUSH_EVERY = 32


class _Deferred:
    """Histogram values queued on the checkout path and recorded into the SDK in batches.

    Each value keeps the OpenTelemetry context it was measured in, so an exemplar still points
    at the request's trace. ``deque.append`` and ``popleft`` are atomic, so threads may queue and
    flush at once without a lock; a value is recorded exactly once.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: deque[
            tuple[metrics.Histogram, float, Mapping[str, str], otel_context.Context]
        ] = deque()

    def record(
        self, histogram: metrics.Histogram, value: float, attributes: Mapping[str, str]
    ) -> None:
        values = self._values
        values.append((histogram, value, attributes, _current_context()))
        if len(values) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        pop = self._values.popleft
        while True:
            try:
                histogram, value, attributes, context = pop()
            except IndexError:
                return
            histogram.record(value, attributes, context)

    def __len__(self) -> int:
        return len(self._values)


# -- the instruments of one meter, shared by every pool reporting through it ----------------------


class _Instruments:
    """The instruments of one meter. SDKs keep the first registration of a name and drop the
    callbacks of any later one, so every pool using the meter shares these and its callbacks."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.pools: weakref.WeakSet[PoolTelemetry] = weakref.WeakSet()
        self.deferred = _Deferred()
        counter, histogram = meter.create_counter, meter.create_histogram
        self.timeouts = counter(
            TIMEOUTS, "{timeout}",
            "The number of connection timeouts that have occurred trying to obtain a connection "
            "from the pool.",
        )  # fmt: skip
        self.create_time = histogram(
            CREATE_TIME, "s", "The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self.wait_time = histogram(
            WAIT_TIME, "s", "The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self.use_time = histogram(
            USE_TIME, "s", "The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self.attempts = counter(
            CONNECT_ATTEMPTS, "{attempt}", "Physical connect attempts, successful and failed."
        )
        self.failed_attempts = counter(
            CONNECT_FAILED_ATTEMPTS, "{attempt}", "Connect attempts that failed, by error.type."
        )
        self.give_ups = counter(
            CONNECT_GIVE_UPS, "{connect}",
            "Connects that failed for good (retries exhausted or a permanent error), by "
            "error.type.",
        )  # fmt: skip
        self.credential_refreshes = counter(
            CREDENTIAL_REFRESHES, "{refresh}", "Times the pool fetched fresh credentials."
        )
        self.retirements = counter(
            RETIREMENTS, "{connection}",
            "Connections closed by the pool because of their lifetime, idle time, a failed "
            "liveness check or idle overflow, by fault_tolerant_pool.retirement.reason.",
        )  # fmt: skip
        self.leaks = counter(
            LEAKS, "{connection}",
            "Connections reported as leaked: held longer than leak_threshold, reclaimed by the "
            "garbage collector, or still out at shutdown, by fault_tolerant_pool.leak.kind.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECTION_COUNT, [self._observe_count], "{connection}",
            "The number of connections that are currently in state described by the state "
            "attribute.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECTION_MAX, [self._observe_max], "{connection}",
            "The maximum number of open connections allowed.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECTION_IDLE_MAX, [self._observe_idle_max], "{connection}",
            "The maximum number of idle open connections allowed.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            PENDING_REQUESTS, [self._observe_pending], "{request}",
            "The number of current pending requests for an open connection.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECT_STATE, [self._observe_state], "{pool}",
            "1 for the pool's connect state (healthy, failing, failing_fast, recovering), 0 for "
            "the others.",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECT_WAITING, [self._observe_waiting], "{request}",
            "Callers waiting for the connect probe (and for a slot, with max_waiting).",
        )  # fmt: skip
        meter.create_observable_counter(
            FAST_FAILURES, [self._observe_fast_failures], "{connect}",
            "Connects refused at once while the pool fails fast.",
        )  # fmt: skip
        meter.create_observable_counter(
            REJECTED_WAITING, [self._observe_rejected], "{request}",
            "Checkouts refused at once because max_waiting callers were already waiting.",
        )  # fmt: skip
        self.outage_duration = histogram(
            OUTAGE_DURATION, "s",
            "How long connecting failed before a connect succeeded again, one value per outage.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip

    # Observable callbacks: run by the reader's collection, never on the checkout path. Pools that
    # share a name are summed, so one name never yields two conflicting observations. Each one
    # first hands the queued histogram values to the SDK (the SDK runs every callback before it
    # reads its aggregations, so a collection always includes every checkout that finished).

    def _observe(
        self, read: Callable[[PoolTelemetry], Iterable[tuple[str | None, int | None]]]
    ) -> Iterator[Observation]:
        self.deferred.flush()
        totals: dict[tuple[str, str | None], int] = {}
        for telemetry in list(self.pools):
            for state, value in read(telemetry):
                if value is not None:
                    key = (telemetry.pool_name, state)
                    totals[key] = totals.get(key, 0) + value
        for (name, state), value in totals.items():
            attributes = {POOL_NAME: name}
            if state is not None:
                attributes[CONNECTION_STATE] = state
            yield Observation(value, attributes)

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        def read(telemetry: PoolTelemetry) -> Iterable[tuple[str | None, int | None]]:
            pool = telemetry.pool()
            if pool is None:
                return ()
            _, idle, used, _ = pool._gauges()
            return (("idle", idle), ("used", used))

        return self._observe(read)

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        def read(telemetry: PoolTelemetry) -> Iterable[tuple[str | None, int | None]]:
            pool = telemetry.pool()
            return () if pool is None else ((None, pool._limits()[0]),)

        return self._observe(read)

    def _observe_idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        def read(telemetry: PoolTelemetry) -> Iterable[tuple[str | None, int | None]]:
            pool = telemetry.pool()
            return () if pool is None else ((None, pool._limits()[1]),)

        return self._observe(read)

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda telemetry: ((None, telemetry.pending),))

    def _figure(self, name: str) -> Iterator[Observation]:
        totals: dict[str, int] = {}
        for telemetry in list(self.pools):
            figures = telemetry.connect_figures
            if figures is not None:
                value = getattr(figures(), name)
                totals[telemetry.pool_name] = totals.get(telemetry.pool_name, 0) + value
        for pool_name, value in totals.items():
            yield Observation(value, {POOL_NAME: pool_name})

    def _observe_state(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[tuple[str, str], int] = {}
        for telemetry in list(self.pools):
            figures = telemetry.connect_figures
            if figures is not None:
                current = figures().state
                for state in CONNECT_STATES:
                    key = (telemetry.pool_name, state)
                    totals[key] = totals.get(key, 0) + (state == current)
        for (pool_name, state), value in totals.items():
            yield Observation(value, {POOL_NAME: pool_name, CONNECT_STATE_ATTRIBUTE: state})

    def _observe_waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._figure("waiting")

    def _observe_fast_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._figure("fast_failures")

    def _observe_rejected(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._figure("rejected")


_GLOBAL = object()  # the registry key of the global meter provider
_registry: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global_instruments: _Instruments | None = None
_registry_lock = threading.Lock()


def _instruments_for(meter_provider: Any) -> _Instruments:
    """The shared instruments of a meter provider (None: the global one, now or once it is set)."""
    global _global_instruments
    with _registry_lock:
        global_provider = metrics.get_meter_provider()  # a proxy until the app sets one
        if meter_provider is None or meter_provider is global_provider:
            if _global_instruments is None:
                _global_instruments = _Instruments(
                    global_provider.get_meter(INSTRUMENTATION_NAME, _version())
                )
            return _global_instruments
        instruments = _registry.get(meter_provider)
        if instruments is None:
            instruments = _Instruments(meter_provider.get_meter(INSTRUMENTATION_NAME, _version()))
            _registry[meter_provider] = instruments
        return instruments


#: A checkout that only waited for a slot gets a span when it waited at least this long (seconds)
#: and runs inside a recording span of the application (a traced request): a saturated pool makes
#: every checkout wait, and a root span per checkout, outside any request, is a trace nobody
#: reads that costs tens of microseconds each. Every wait is still recorded in
#: ``db.client.connection.wait_time``; a checkout that failed (a pool timeout) or made a
#: connection always gets its span.
CHECKOUT_SPAN_MIN_WAIT = 0.005

# -- whether anything listens --------------------------------------------------------------------

_trace_api: Any = trace
_metrics_api: Any
try:
    from opentelemetry.metrics import _internal as _metrics_api
except ImportError:  # pragma: no cover - a future API layout: then always measure
    _metrics_api = None


_GLOBALS_FOUND = (
    _metrics_api is not None
    and hasattr(_trace_api, "_TRACER_PROVIDER")
    and hasattr(_metrics_api, "_METER_PROVIDER")
)


def _sdk_installed_globally() -> bool:
    """Whether the application has set a global tracer or meter provider (an SDK).

    Until it does, the API's proxies drop everything, so a checkout skips its measurements
    (the hot path costs one call). The API keeps these globals private; if they are not where
    they are expected, measure always.
    """
    if not _GLOBALS_FOUND:
        return True
    return _trace_api._TRACER_PROVIDER is not None or _metrics_api._METER_PROVIDER is not None


def _is_noop(provider: Any) -> bool:
    return type(provider).__name__.startswith("NoOp")


# -- one checkout in progress ---------------------------------------------------------------------


class Checkout:
    """A checkout in progress; the connector finds it to parent its span under a checkout span."""

    __slots__ = ("span", "started", "telemetry", "token", "waits")

    def __init__(self, telemetry: PoolTelemetry, started: float, waits: bool) -> None:
        self.telemetry = telemetry
        self.started = started
        self.waits = waits
        self.span: trace.Span | None = None
        self.token: Token[Checkout | None] | None = None

    def leave(self) -> None:
        """Stop being the current checkout (at the end of the pool's ``connect()``)."""
        token = self.token
        if token is not None:
            self.token = None
            try:  # noqa: SIM105 - hot path: contextlib.suppress costs a context manager
                _current_checkout.reset(token)
            except ValueError:  # another context (a caller that switched contexts mid-checkout)
                pass


_current_checkout: ContextVar[Checkout | None] = ContextVar(
    "fault_tolerant_pool.checkout", default=None
)

_CHECKED_OUT_AT = "_fault_tolerant_pool_checked_out_at"


def _wall_ns(perf_time: float) -> int:
    """A ``time.perf_counter()`` reading as nanoseconds since the epoch (a span's start time)."""
    return time.time_ns() - int((time.perf_counter() - perf_time) * 1e9)


# -- the telemetry of one pool (and of every pool it is recreated as) -----------------------------


class PoolTelemetry:
    """Spans and metrics of one pool; survives ``engine.dispose()`` with the pool's settings."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        system: str = "postgresql",
        pool_name: str | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        secrets: Callable[[], tuple[str, ...]] = tuple,
    ) -> None:
        self.endpoint = endpoint
        self.pool_name = pool_name or (endpoint.pool_name() if endpoint.known else system)
        self.attributes: Mapping[str, str] = {POOL_NAME: self.pool_name}
        self.span_attributes: Mapping[str, str | int] = {
            DB_SYSTEM_NAME: system,
            **endpoint.attributes(),
            POOL_NAME: self.pool_name,
        }
        self._secrets = secrets
        self._tracer = (
            trace.get_tracer(INSTRUMENTATION_NAME, _version())
            if tracer_provider is None
            else tracer_provider.get_tracer(INSTRUMENTATION_NAME, _version())
        )
        self._instruments = _instruments_for(meter_provider)
        # Explicit providers that are not the API's no-op ones: always measure.
        self._measuring = any(
            p is not None and not _is_noop(p) for p in (tracer_provider, meter_provider)
        )
        # Whether the checkout histograms are kept: spans alone (an SDK tracer provider, no
        # meter provider) queue no values for the API's no-op histograms.
        self._metering = meter_provider is not None and not _is_noop(meter_provider)
        self._global_meter = meter_provider is None
        self._pool: Callable[[], PoolGauges | None] = lambda: None
        self._pending: set[Checkout] = set()  # add and discard are atomic: no lock
        self._error_attributes: dict[str, Mapping[str, str]] = {}
        self.connect_figures: Callable[[], Any] | None = None
        """The gate's ``figures()`` (its state, waiters, fast failures), read at collection."""
        self._retirement_attributes: dict[str, Mapping[str, str]] = {
            reason: {POOL_NAME: self.pool_name, RETIREMENT_REASON: reason}
            for reason in RETIREMENT_REASONS
        }  # built once, as every attribute mapping of the pool
        self._instruments.pools.add(self)

    @classmethod
    def from_arguments(
        cls,
        *,
        endpoint: Endpoint,
        system: str,
        pool_name: Any,
        tracer_provider: Any,
        meter_provider: Any,
        secrets: Callable[[], tuple[str, ...]] = tuple,
    ) -> PoolTelemetry:
        """Validate the pool's telemetry keyword arguments (``engine_from_config`` strings too)."""
        if pool_name is not None:
            if not isinstance(pool_name, str) or not pool_name.strip():
                raise ArgumentError(f"pool_name must be a non-empty string, got {pool_name!r}")
            pool_name = pool_name.strip()
        for name, value, method in (
            ("tracer_provider", tracer_provider, "get_tracer"),
            ("meter_provider", meter_provider, "get_meter"),
        ):
            if value is not None and not callable(getattr(value, method, None)):
                raise ArgumentError(
                    f"{name} must be an OpenTelemetry {name.replace('_', ' ')} "
                    f"(with {method}()), got {value!r}"
                )
        return cls(
            endpoint=endpoint,
            system=system,
            pool_name=pool_name,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            secrets=secrets,
        )

    def bind(self, pool: PoolGauges) -> None:
        """Make ``pool`` the one the gauges read (the newest, after ``engine.dispose()``)."""
        self._pool = weakref.ref(pool)

    def pool(self) -> PoolGauges | None:
        return self._pool()

    def _with_error(self, error_type: str) -> Mapping[str, str]:
        attributes = self._error_attributes.get(error_type)
        if attributes is None:
            attributes = {POOL_NAME: self.pool_name, ERROR_TYPE: error_type}
            if len(self._error_attributes) < 256:  # a bounded cache: error types are few
                self._error_attributes[error_type] = attributes
        return attributes

    def active(self) -> bool:
        """Whether checkouts are measured: a provider was passed, or a global one is set.

        The API sets a global provider once per process, so once one is seen it stays seen.
        """
        if self._measuring:
            return True
        if not _GLOBALS_FOUND or (  # _sdk_installed_globally(), inlined: every checkout asks
            _trace_api._TRACER_PROVIDER is not None or _metrics_api._METER_PROVIDER is not None
        ):
            self._measuring = True
            return True
        return False

    def _values_kept(self) -> bool:
        """Whether a meter provider keeps the histogram values (once seen, it stays seen)."""
        if self._global_meter and (not _GLOBALS_FOUND or _metrics_api._METER_PROVIDER is not None):
            self._metering = True
        return self._metering

    @property
    def pending(self) -> int:
        """Callers inside the pool's checkout right now (``pending_requests``)."""
        return len(self._pending)

    # -- checkout (the hot path: a set, a context variable, two clock reads, one queued value) ----

    def checkout_started(self, waits: bool) -> Checkout:
        """A caller entered the pool's checkout; ``waits``: no idle connection and no free slot."""
        checkout = Checkout(self, time.perf_counter(), waits)
        self._pending.add(checkout)
        checkout.token = _current_checkout.set(checkout)
        return checkout

    def checked_out(self, checkout: Checkout, connection: Any) -> None:
        """The caller got ``connection``: record the wait, start the use time."""
        now = time.perf_counter()
        self._pending.discard(checkout)
        token = checkout.token  # checkout.leave(), inlined: the hot path
        if token is not None:
            checkout.token = None
            try:  # noqa: SIM105 - hot path: contextlib.suppress costs a context manager
                _current_checkout.reset(token)
            except ValueError:  # another context (a caller that switched contexts mid-checkout)
                pass
        waited = now - checkout.started
        if self._metering or self._values_kept():
            instruments = self._instruments
            instruments.deferred.record(instruments.wait_time, waited, self.attributes)
            record = connection._connection_record
            if record is not None:
                record.__dict__[_CHECKED_OUT_AT] = now
        if checkout.span is not None or (
            checkout.waits
            and waited >= CHECKOUT_SPAN_MIN_WAIT
            and trace.get_current_span().is_recording()
        ):
            self._end_checkout_span(checkout, None)

    def checkout_failed(self, checkout: Checkout, error: BaseException) -> None:
        """The checkout raised (pool timeout, connect given up, cancellation)."""
        self._pending.discard(checkout)
        checkout.leave()
        if isinstance(error, PoolTimeoutError):
            self._instruments.timeouts.add(1, self.attributes)
        if checkout.span is not None or checkout.waits:
            self._end_checkout_span(checkout, error)

    def checked_in(self, record: Any) -> None:
        """A connection came back to the pool: record how long the caller held it (a no-op for
        a checkout that was not measured)."""
        started = record.__dict__.pop(_CHECKED_OUT_AT, None)
        if started is not None:
            instruments = self._instruments
            instruments.deferred.record(
                instruments.use_time, time.perf_counter() - started, self.attributes
            )

    def _checkout_span(self, checkout: Checkout) -> trace.Span:
        if checkout.span is None:
            checkout.span = self._tracer.start_span(
                CHECKOUT_SPAN,
                attributes=self.span_attributes,
                start_time=_wall_ns(checkout.started),
            )
        return checkout.span

    def _end_checkout_span(self, checkout: Checkout, error: BaseException | None) -> None:
        connected = checkout.span is not None  # only a connect starts it before the end
        span = self._checkout_span(checkout)
        if span.is_recording():
            span.set_attribute(CHECKOUT_WAITED, checkout.waits)
            span.set_attribute(CHECKOUT_CONNECTED, connected)
            if error is not None:
                span.set_attribute(ERROR_TYPE, error_type(error))
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    # -- connect ----------------------------------------------------------------------------------

    def connect(self) -> ConnectTrace:
        """Trace one physical connect with its retries: ``with telemetry.connect() as trace:``."""
        checkout = _current_checkout.get()
        parent = None
        if checkout is not None and checkout.telemetry is self:
            parent = trace.set_span_in_context(self._checkout_span(checkout))
        span = self._tracer.start_span(
            CONNECT_SPAN, context=parent, kind=SpanKind.CLIENT, attributes=self.span_attributes
        )
        return ConnectTrace(self, span)

    # -- extension metrics for the credential and lifetime features -------------------------------

    def credentials_refreshed(self) -> None:
        """Count a fetch of fresh credentials (``fault_tolerant_pool.credential.refreshes``)."""
        self._instruments.credential_refreshes.add(1, self.attributes)

    def failed_fast(self) -> None:
        """A connect refused while failing fast (counted by an observable counter)."""

    def outage_ended(self, seconds: float) -> None:
        """Record how long connecting failed (``fault_tolerant_pool.connect.outage.duration``)."""
        self._instruments.outage_duration.record(seconds, self.attributes)

    def retired(self, reason: str) -> None:
        """Count a connection the pool closed (reason: lifetime, idle, liveness or overflow)."""
        attributes = self._retirement_attributes.get(reason)
        if attributes is None:
            raise ValueError(f"retirement reason must be one of {RETIREMENT_REASONS}: {reason!r}")
        self._instruments.retirements.add(1, attributes)

    def leaked(self, kind: str) -> None:
        """Count a leak report: ``kind`` is held, reclaimed or shutdown."""
        if kind not in LEAK_KINDS:
            raise ValueError(f"leak kind must be one of {LEAK_KINDS}: {kind!r}")
        self._instruments.leaks.add(1, {POOL_NAME: self.pool_name, LEAK_KIND: kind})


class ConnectTrace:
    """The span and metrics of one physical connect; a context manager around the retry loop.

    The span is the current span while the connect runs, so a driver's own instrumentation nests
    under it. Failed attempts become events (see docs/opentelemetry.md for why not child spans).
    """

    __slots__ = ("_attempts", "_done", "_span", "_telemetry", "_token")

    def __init__(self, telemetry: PoolTelemetry, span: trace.Span) -> None:
        self._telemetry = telemetry
        self._span = span
        self._attempts = 0
        self._done = False
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> ConnectTrace:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        span = self._span
        if span.is_recording():
            span.set_attribute(ATTEMPT_COUNT, self._attempts)
            if error is not None and not self._done:  # cancelled, or a bug in a listener
                span.set_attribute(ERROR_TYPE, error_type(error))
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def attempt_failed(
        self,
        error: Exception,
        verdict: Verdict,
        *,
        duration: float,
        backoff: float | None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        """Record a failed attempt; ``backoff`` is the sleep before the next one (None: no more)."""
        self._attempts += 1
        telemetry = self._telemetry
        instruments = telemetry._instruments
        kind = verdict_error_type(verdict)
        instruments.attempts.add(1, telemetry.attributes)
        instruments.failed_attempts.add(1, telemetry._with_error(kind))
        span = self._span
        if span.is_recording():
            attributes: dict[str, str | int | float | bool] = {
                ATTEMPT_NUMBER: self._attempts,
                ERROR_TYPE: kind,
                EXCEPTION_TYPE: type(error).__name__,
                EXCEPTION_MESSAGE: one_line(redact(str(error), secrets + telemetry._secrets())),
                ATTEMPT_DURATION: duration,
                ATTEMPT_TRANSIENT: verdict.transient,
            }
            if backoff is not None:
                attributes[ATTEMPT_BACKOFF] = backoff
            span.add_event(ATTEMPT_FAILED_EVENT, attributes)

    def connected(self, elapsed: float) -> None:
        """The attempt succeeded; ``elapsed``: seconds since the first attempt began."""
        self._attempts += 1
        self._done = True
        telemetry = self._telemetry
        telemetry._instruments.attempts.add(1, telemetry.attributes)
        telemetry._instruments.create_time.record(elapsed, telemetry.attributes)

    def gave_up(self, verdict: Verdict, error: BaseException) -> None:
        """The connect failed for good: error status, ``error.type`` of the last failure."""
        self._done = True
        telemetry = self._telemetry
        kind = verdict_error_type(verdict)
        telemetry._instruments.give_ups.add(1, telemetry._with_error(kind))
        span = self._span
        if span.is_recording():
            span.set_attribute(ERROR_TYPE, kind)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))


class Untraced:
    """Stands in for :class:`ConnectTrace` when nothing listens (only the API's no-op
    providers): a connect then starts no span and touches no instrument, which would drop it all.
    """

    __slots__ = ()

    def attempt_failed(
        self,
        error: Exception,
        verdict: Verdict,
        *,
        duration: float,
        backoff: float | None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        pass

    def connected(self, elapsed: float) -> None:
        pass

    def gave_up(self, verdict: Verdict, error: BaseException) -> None:
        pass


UNTRACED = Untraced()

_NO_TRACES = trace.NoOpTracerProvider()
_NO_METRICS = metrics.NoOpMeterProvider()


def disabled() -> PoolTelemetry:
    """Telemetry that goes nowhere, for a connector built without a pool (unit tests)."""
    return PoolTelemetry(
        endpoint=Endpoint(), tracer_provider=_NO_TRACES, meter_provider=_NO_METRICS
    )

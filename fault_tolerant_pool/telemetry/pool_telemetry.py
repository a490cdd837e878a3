"""The telemetry of one pool: what the pool and its connector call at each checkout, checkin,
connect and retirement, turned into spans and metric values.

:class:`PoolTelemetry` is the one object the pool holds (it survives ``engine.dispose()``). Its
checkout methods run on every checkout, thousands of times a second, so they are written flat: a
set, a context variable, two clock reads and one queued histogram value, and a checkout span only
when the caller waited or a connection was made for it. The checkout in progress
(:class:`Checkout`) is the current one in a context variable, so that a connect made for it
finds it and parents its span under the checkout span. Whether anything listens is decided here
too: until an SDK is installed or a provider is passed, the API's proxies drop everything, so a
checkout skips its measurements.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy.exc import ArgumentError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..endpoint import Endpoint
from ..notes import notes_of
from .metrics import PoolGauges, _instruments_for
from .names import (
    CHECKOUT_CONNECTED,
    CHECKOUT_SPAN,
    CHECKOUT_WAITED,
    CONNECT_SPAN,
    DB_SYSTEM_NAME,
    ERROR_TYPE,
    INSTRUMENTATION_NAME,
    LEAK_KIND,
    LEAK_KINDS,
    POOL_NAME,
    RETIREMENT_REASON,
    RETIREMENT_REASONS,
    _version,
    error_type,
)
from .spans import CHECKOUT_SPAN_MIN_WAIT, ConnectTrace, _wall_ns

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


# Defined here, beside the checkout methods that set and reset it, not imported: CPython 3.11
# and later compile a method call on an imported name as an attribute load that makes a bound
# method, about 90 ns more on every checkout.
_current_checkout: ContextVar[Checkout | None] = ContextVar(
    "fault_tolerant_pool.checkout", default=None
)


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
            if record is not None:  # the checkin reads it back for the use time
                try:
                    record.notes.checked_out_at = now
                except AttributeError:  # a record made by hand, not by the pool
                    notes_of(record).checked_out_at = now
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
        try:
            notes = record.notes
        except AttributeError:  # a record made by hand, not by the pool: never measured
            return
        started = notes.checked_out_at
        if started is not None:
            notes.checked_out_at = None
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


_NO_TRACES = trace.NoOpTracerProvider()
_NO_METRICS = metrics.NoOpMeterProvider()


def disabled() -> PoolTelemetry:
    """Telemetry that goes nowhere, for a connector built without a pool (unit tests)."""
    return PoolTelemetry(
        endpoint=Endpoint(), tracer_provider=_NO_TRACES, meter_provider=_NO_METRICS
    )

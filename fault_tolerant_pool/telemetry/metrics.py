"""The pools' metrics: the instruments of a meter, the callbacks of its observable ones, and the
queue that hands checkout histogram values to the SDK in batches.

SDKs keep the first registration of an instrument name and drop the callbacks of any later one,
so the instruments of one meter are made once and shared by every pool reporting through it
(:func:`_instruments_for`). The gauges (counts, limits, pending requests, the connect state) are
observable instruments that read the pools when a reader collects: a checkout does nothing for
them. A checkout's two histogram values (wait time, use time) are queued and handed to the SDK in
batches (see :class:`_Deferred`): the SDK's ``Histogram.record`` costs about 6 µs in a tight loop
and nearly twice that when called once between other work, which a saturated event loop feels.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .names import (
    CONNECT_ATTEMPTS,
    CONNECT_FAILED_ATTEMPTS,
    CONNECT_GIVE_UPS,
    CONNECT_STATE,
    CONNECT_STATE_ATTRIBUTE,
    CONNECT_STATES,
    CONNECT_WAITING,
    CONNECTION_COUNT,
    CONNECTION_IDLE_MAX,
    CONNECTION_MAX,
    CONNECTION_STATE,
    CREATE_TIME,
    CREDENTIAL_REFRESHES,
    FAST_FAILURES,
    INSTRUMENTATION_NAME,
    LEAKS,
    OUTAGE_DURATION,
    PENDING_REQUESTS,
    POOL_NAME,
    REJECTED_WAITING,
    RETIREMENTS,
    TIMEOUTS,
    USE_TIME,
    WAIT_TIME,
    _version,
)

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


class _Observed(Protocol):
    """What the observable callbacks read from each pool's telemetry (a ``PoolTelemetry``).

    A protocol, so that this module, which the pool's telemetry imports, imports nothing of it.
    """

    pool_name: str
    connect_figures: Callable[[], Any] | None

    @property
    def pending(self) -> int:
        """Callers inside the pool's checkout right now."""

    def pool(self) -> PoolGauges | None:
        """The pool the gauges read (None: it is gone)."""


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
        self.pools: weakref.WeakSet[_Observed] = weakref.WeakSet()
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
        self, read: Callable[[_Observed], Iterable[tuple[str | None, int | None]]]
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
        def read(telemetry: _Observed) -> Iterable[tuple[str | None, int | None]]:
            pool = telemetry.pool()
            if pool is None:
                return ()
            _, idle, used, _ = pool._gauges()
            return (("idle", idle), ("used", used))

        return self._observe(read)

    def _observe_max(self, options: CallbackOptions) -> Iterable[Observation]:
        def read(telemetry: _Observed) -> Iterable[tuple[str | None, int | None]]:
            pool = telemetry.pool()
            return () if pool is None else ((None, pool._limits()[0]),)

        return self._observe(read)

    def _observe_idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        def read(telemetry: _Observed) -> Iterable[tuple[str | None, int | None]]:
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

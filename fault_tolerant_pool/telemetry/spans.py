"""The connect span, and what decides a checkout span's start and whether there is one.

A span per physical connect (``fault_tolerant_pool.connect``, kind CLIENT) around the whole retry
sequence (:class:`ConnectTrace`); each failed attempt is an event on it
(``fault_tolerant_pool.attempt.failed``). The same object counts the connect's attempts and
records its ``create_time``, so a connect is measured in one place. :class:`Untraced` stands in
for it when nothing listens. The checkout span (``fault_tolerant_pool.checkout``, the connect
span's parent when a connection was made for the checkout) is started and ended on the checkout
path, by the pool's telemetry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from ..classify import Verdict
from ..errors import one_line, redact
from .names import (
    ATTEMPT_BACKOFF,
    ATTEMPT_COUNT,
    ATTEMPT_DURATION,
    ATTEMPT_FAILED_EVENT,
    ATTEMPT_NUMBER,
    ATTEMPT_TRANSIENT,
    ERROR_TYPE,
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
    error_type,
    verdict_error_type,
)

if TYPE_CHECKING:
    from .metrics import _Instruments


class _Owner(Protocol):
    """What a connect trace uses of the pool's telemetry it belongs to (a ``PoolTelemetry``).

    A protocol, so that this module, which the pool's telemetry imports, imports nothing of it.
    """

    attributes: Mapping[str, str]
    _instruments: _Instruments
    _secrets: Callable[[], tuple[str, ...]]

    def _with_error(self, error_type: str) -> Mapping[str, str]:
        """The metric attributes of a failure of type ``error_type``."""


#: A checkout that only waited for a slot gets a span when it waited at least this long (seconds)
#: and runs inside a recording span of the application (a traced request): a saturated pool makes
#: every checkout wait, and a root span per checkout, outside any request, is a trace nobody
#: reads that costs tens of microseconds each. Every wait is still recorded in
#: ``db.client.connection.wait_time``; a checkout that failed (a pool timeout) or made a
#: connection always gets its span.
CHECKOUT_SPAN_MIN_WAIT = 0.005


def _wall_ns(perf_time: float) -> int:
    """A ``time.perf_counter()`` reading as nanoseconds since the epoch (a span's start time)."""
    return time.time_ns() - int((time.perf_counter() - perf_time) * 1e9)


# -- one physical connect, with its retries --------------------------------------------------------


class ConnectTrace:
    """The span and metrics of one physical connect; a context manager around the retry loop.

    The span is the current span while the connect runs, so a driver's own instrumentation nests
    under it. Failed attempts become events (see docs/opentelemetry.md for why not child spans).
    """

    __slots__ = ("_attempts", "_done", "_span", "_telemetry", "_token")

    def __init__(self, telemetry: _Owner, span: trace.Span) -> None:
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

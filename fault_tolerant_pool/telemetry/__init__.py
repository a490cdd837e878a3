"""OpenTelemetry for the pools: spans for connects and slow checkouts, the conventions' metrics.

- A span per physical connect (``fault_tolerant_pool.connect``, kind CLIENT) around the whole retry
  sequence; each failed attempt is an event on it (``fault_tolerant_pool.attempt.failed``).
- A span per checkout (``fault_tolerant_pool.checkout``) only when the caller waited for a slot or
  a connection was created for it; the connect span is then its child.
- The ``db.client.connection.*`` pool metrics of the semantic conventions, and the project's
  ``fault_tolerant_pool.*`` extension metrics (see docs/opentelemetry.md for the list).

Only opentelemetry-api is used: without an SDK every call lands on a no-op. One module a concern,
each importing only the ones above it:

- ``names``: what the signals are called, the values their enumerated attributes take, and what
  ``error.type`` says of an error;
- ``metrics``: the instruments of a meter, shared by its pools, the observable callbacks that
  read the pools at collection, and the queue that hands checkout histogram values to the SDK in
  batches;
- ``spans``: the connect span with its attempts (``ConnectTrace``, ``Untraced``), and when a
  checkout gets a span of its own;
- ``pool_telemetry``: ``PoolTelemetry``, what the pool and its connector call at each checkout,
  checkin, connect and retirement, the checkout in progress (``Checkout``), and whether anything
  listens.

This module re-exports their public names, so ``fault_tolerant_pool.telemetry`` reads as one.
"""

from __future__ import annotations

from .metrics import DURATION_BUCKETS, FLUSH_EVERY, PoolGauges
from .names import (
    ATTEMPT_BACKOFF,
    ATTEMPT_COUNT,
    ATTEMPT_DURATION,
    ATTEMPT_FAILED_EVENT,
    ATTEMPT_NUMBER,
    ATTEMPT_TRANSIENT,
    CHECKOUT_CONNECTED,
    CHECKOUT_SPAN,
    CHECKOUT_WAITED,
    CONNECT_ATTEMPTS,
    CONNECT_FAILED_ATTEMPTS,
    CONNECT_GIVE_UPS,
    CONNECT_SPAN,
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
    DB_SYSTEM_NAME,
    ERROR_TYPE,
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
    FAST_FAILURES,
    INSTRUMENTATION_NAME,
    LEAK_KIND,
    LEAK_KINDS,
    LEAKS,
    OUTAGE_DURATION,
    PENDING_REQUESTS,
    POOL_NAME,
    REJECTED_WAITING,
    RETIREMENT_REASON,
    RETIREMENT_REASONS,
    RETIREMENTS,
    TIMEOUTS,
    USE_TIME,
    WAIT_TIME,
    error_type,
    verdict_error_type,
)

# Private, but the replica router's meter carries the version too (replicas.py).
from .names import _version as _version
from .pool_telemetry import Checkout, PoolTelemetry, disabled
from .spans import CHECKOUT_SPAN_MIN_WAIT, UNTRACED, ConnectTrace, Untraced

__all__ = [
    "ATTEMPT_BACKOFF",
    "ATTEMPT_COUNT",
    "ATTEMPT_DURATION",
    "ATTEMPT_FAILED_EVENT",
    "ATTEMPT_NUMBER",
    "ATTEMPT_TRANSIENT",
    "CHECKOUT_CONNECTED",
    "CHECKOUT_SPAN",
    "CHECKOUT_SPAN_MIN_WAIT",
    "CHECKOUT_WAITED",
    "CONNECTION_COUNT",
    "CONNECTION_IDLE_MAX",
    "CONNECTION_MAX",
    "CONNECTION_STATE",
    "CONNECT_ATTEMPTS",
    "CONNECT_FAILED_ATTEMPTS",
    "CONNECT_GIVE_UPS",
    "CONNECT_SPAN",
    "CONNECT_STATE",
    "CONNECT_STATES",
    "CONNECT_STATE_ATTRIBUTE",
    "CONNECT_WAITING",
    "CREATE_TIME",
    "CREDENTIAL_REFRESHES",
    "DB_SYSTEM_NAME",
    "DURATION_BUCKETS",
    "ERROR_TYPE",
    "EXCEPTION_MESSAGE",
    "EXCEPTION_TYPE",
    "FAST_FAILURES",
    "FLUSH_EVERY",
    "INSTRUMENTATION_NAME",
    "LEAKS",
    "LEAK_KIND",
    "LEAK_KINDS",
    "OUTAGE_DURATION",
    "PENDING_REQUESTS",
    "POOL_NAME",
    "REJECTED_WAITING",
    "RETIREMENTS",
    "RETIREMENT_REASON",
    "RETIREMENT_REASONS",
    "TIMEOUTS",
    "UNTRACED",
    "USE_TIME",
    "WAIT_TIME",
    "Checkout",
    "ConnectTrace",
    "PoolGauges",
    "PoolTelemetry",
    "Untraced",
    "disabled",
    "error_type",
    "verdict_error_type",
]

"""The names the telemetry reports under, and the values some of its attributes take.

The instrumentation scope (``fault_tolerant_pool`` and the installed version), the semantic
conventions' attribute and metric names, this project's own span, event, attribute and metric
names (all prefixed ``fault_tolerant_pool.``, so that none is taken for a convention), and what
``error.type`` says of an error. Spans and metrics both speak this vocabulary, so it sits below
both; docs/opentelemetry.md lists it for users.
"""

from __future__ import annotations

from functools import lru_cache

from ..classify import Verdict, classify, sqlstate_of
from ..errors import ConnectRetriesExhausted

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

"""SQLAlchemy pools that survive database blips: every connect is retried with backoff.

Pass ``poolclass=FaultTolerantQueuePool`` (or ``FaultTolerantNullPool`` behind PgBouncer) to
``create_engine`` or ``create_async_engine``; nothing else in the application changes.
"""

from .classify import Verdict, classify
from .errors import ConnectRetriesExhausted
from .policy import RetryPolicy
from .pool import (
    FaultTolerance,
    FaultTolerantAsyncQueuePool,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
)
from .stats import LastError, PoolStats

__all__ = [
    "ConnectRetriesExhausted",
    "FaultTolerance",
    "FaultTolerantAsyncQueuePool",
    "FaultTolerantNullPool",
    "FaultTolerantQueuePool",
    "LastError",
    "PoolStats",
    "RetryPolicy",
    "Verdict",
    "classify",
]
__version__ = "0.1.0"

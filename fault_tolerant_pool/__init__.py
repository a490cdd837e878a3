"""SQLAlchemy pools that survive database blips: every connect is retried with backoff.

Pass ``poolclass=FaultTolerantQueuePool`` (or ``FaultTolerantNullPool`` behind PgBouncer) to
``create_engine`` or ``create_async_engine``; nothing else in the application changes.
"""

from ._version import __version__ as __version__
from .classify import Verdict, classify
from .credentials import CredentialsProvider, FileCredentials
from .errors import (
    ConnectRetriesExhausted,
    CredentialsError,
    DatabaseUnreachable,
    TooManyWaiting,
)
from .iam import RdsIamCredentials
from .policy import RetryPolicy
from .pool import (
    FaultTolerance,
    FaultTolerantAsyncQueuePool,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
)
from .replicas import (
    NoReaderAvailable,
    ReaderStatus,
    ReplicaRouter,
    RouterStats,
    RoutingSession,
)
from .shutdown import PoolClosed, ShutdownReport, drain, shutdown
from .stats import LastError, PoolStats
from .transaction import (
    TransactionOutcomeUnknown,
    TransactionRunner,
    run_transaction,
    run_transaction_async,
    transactional,
)

__all__ = [
    "ConnectRetriesExhausted",
    "CredentialsError",
    "CredentialsProvider",
    "DatabaseUnreachable",
    "FaultTolerance",
    "FaultTolerantAsyncQueuePool",
    "FaultTolerantNullPool",
    "FaultTolerantQueuePool",
    "FileCredentials",
    "LastError",
    "NoReaderAvailable",
    "PoolClosed",
    "PoolStats",
    "RdsIamCredentials",
    "ReaderStatus",
    "ReplicaRouter",
    "RetryPolicy",
    "RouterStats",
    "RoutingSession",
    "ShutdownReport",
    "TooManyWaiting",
    "TransactionOutcomeUnknown",
    "TransactionRunner",
    "Verdict",
    "classify",
    "drain",
    "run_transaction",
    "run_transaction_async",
    "shutdown",
    "transactional",
]

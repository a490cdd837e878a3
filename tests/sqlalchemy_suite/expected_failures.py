"""The tests of SQLAlchemy's pool suite that fail with this project's pools, each with why.

Data, mirrored in docs/sqlalchemy.md ("SQLAlchemy's own pool tests"); a unit test keeps the two
equal.
Every entry is run as a strict xfail: when it starts passing, the run fails, so the list cannot
rot. An entry whose reason starts with :data:`NOT_RUN` is deselected instead (it fails with the
stock pools too, in a way a strict xfail cannot hold). Keys are pytest node ids, relative to the
sdist's root.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mode:
    """One run of the suite: which files, and this project's arguments given to every pool."""

    paths: tuple[str, ...]
    pool_defaults: dict[str, object] = field(default_factory=dict)
    pytest_args: tuple[str, ...] = ()


SUITE = ("test/engine/test_pool.py", "test/engine/test_reconnect.py", "test/engine/test_logging.py")
#: SQLAlchemy's sqlite file database: engines get the (substituted) QueuePool; on its default
#: in-memory database they get SingletonThreadPool, and only the pools the tests build by name
#: are this project's.
FILE_DB = ("--db", "sqlite_file")


MODES: dict[str, Mode] = {
    # The pools as a user gets them, nothing but poolclass=, on SQLAlchemy's default database.
    "defaults": Mode(SUITE),
    # The same on a file database: every engine of the tests runs on FaultTolerantQueuePool.
    "file_db": Mode(SUITE, pytest_args=FILE_DB),
    # The liveness check's ping at every checkout (not only after 1 s idle), file database: the
    # reconnect tests, pre-ping and handle_error verdicts among them, meet the project's ping.
    "ping_every_checkout": Mode(
        ("test/engine/test_reconnect.py",), {"liveness_ping_after": 0}, FILE_DB
    ),
}

NOT_RUN = "not run: "

CONNECT_TIMEOUT = (
    "retry_attempt_timeout (default 5 s) is told to the driver as its connect timeout, so the "
    "DBAPI connect() gets connect_timeout=5 the test does not expect; retry_attempt_timeout=None "
    "passes the arguments unchanged"
)
GIVE_UP_ERROR = (
    "a connect that fails for good raises ConnectRetriesExhausted (a subclass of the DBAPI's "
    "Error, chained from the driver's MockDisconnect, which is its last_error), not the driver's "
    "error itself; through an engine both are wrapped as sqlalchemy.exc.DBAPIError"
)
PING_FINDS_IT = (
    "liveness_ping_after=0 pings at checkout, so the stopped (or restarted) database is found "
    "there, before the statement at which the test (pre_ping=False) expects the error"
)
LOGGER_NAME = (
    "the test derives the logger name from the pool's class name "
    "(sqlalchemy.pool.impl.FaultTolerantQueuePool.mypoolname); the pools log under the stock "
    "class's name, sqlalchemy.pool.impl.QueuePool.mypoolname, on purpose"
)
LOCKED_FILE = (
    NOT_RUN + "its teardown fails with the stock QueuePool too on a file database "
    "(sqlite3 'database is locked' in drop_all)"
)
TWO_PINGS = (
    "liveness_ping_after=0 pings at checkout, and pool_pre_ping=True pings again: the test counts "
    "one cursor() more than it expects"
)

DOUBT_PING = (
    'retry_ping="auto" pings new connections for 10 s after a disconnect (here the failed '
    "pre-ping of the old connection): the new connection's mock shows the ping's cursor() the "
    "test does not expect; retry_ping=False leaves new connections unpinged"
)

_DEFAULTS = {
    "test/engine/test_reconnect.py::MockReconnectTest::test_conn_reusable": CONNECT_TIMEOUT,
    "test/engine/test_reconnect.py::PrePingMockTest::test_raise_db_is_stopped": GIVE_UP_ERROR,
    "test/engine/test_reconnect.py::PrePingMockTest::test_pre_ping_weakref_finalizer": DOUBT_PING,
}
_FILE_DB = {
    **_DEFAULTS,
    "test/engine/test_logging.py::LoggingNameTest::test_named_logger_echoflags_execute": (
        LOGGER_NAME
    ),
    "test/engine/test_logging.py::LoggingNameTest::test_unnamed_logger_echoflags_execute": (
        LOGGER_NAME
    ),
    "test/engine/test_reconnect.py::InvalidateDuringResultTest::test_invalidate_on_results": (
        LOCKED_FILE
    ),
}
_PING_EVERY = {
    **_DEFAULTS,
    "test/engine/test_reconnect.py::InvalidateDuringResultTest::test_invalidate_on_results": (
        LOCKED_FILE
    ),
    "test/engine/test_reconnect.py::PrePingMockTest::test_waits_til_exec_wo_ping_db_is_stopped": (
        PING_FINDS_IT
    ),
    "test/engine/test_reconnect.py::PrePingMockTest::test_waits_til_exec_wo_ping_db_is_restarted": (
        PING_FINDS_IT
    ),
    "test/engine/test_reconnect.py::PrePingMockTest::test_ping_not_on_first_connect": TWO_PINGS,
    "test/engine/test_reconnect.py::PrePingMockTest::test_ping_not_on_reconnect": TWO_PINGS,
    "test/engine/test_reconnect.py::PrePingMockTest::test_pre_ping_weakref_finalizer": TWO_PINGS,
}

OVERFLOW_KEPT = (
    "overflow_idle (default 30 s) keeps a returned overflow connection idle instead of closing "
    "it when pool_size others are idle (SQLAlchemy's rule, restored by overflow_idle=0): the "
    "test counts the closes or checkedin()/overflow() that rule gives"
)
_OVERFLOW = {
    "test/engine/test_pool.py::QueuePoolTest::test_overflow_no_gc": OVERFLOW_KEPT,
    "test/engine/test_pool.py::QueuePoolTest::test_queuepool_close": OVERFLOW_KEPT,
    "test/engine/test_pool.py::QueuePoolTest::test_queuepool_del": OVERFLOW_KEPT,
}

#: SQLAlchemy release series -> mode -> {test node id: reason}.
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    series: {
        "defaults": {**_DEFAULTS, **_OVERFLOW},
        "file_db": {**_FILE_DB, **_OVERFLOW},
        "ping_every_checkout": _PING_EVERY,
    }
    for series in ("2.0", "2.1")
}

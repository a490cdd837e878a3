"""The tests of SQLAlchemy's pool suite that fail with this project's pools, each with why.

Data, mirrored in the README ("SQLAlchemy's own pool tests"); a unit test keeps the two equal.
Every entry is run as a strict xfail: when it starts passing, the run fails, so the list cannot
rot. Keys are pytest node ids, relative to the sdist's root.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mode:
    """One run of the suite: which files, and this project's arguments given to every pool."""

    paths: tuple[str, ...]
    pool_defaults: dict[str, object] = field(default_factory=dict)


MODES: dict[str, Mode] = {
    # The pools as a user gets them: nothing but poolclass=.
    "defaults": Mode(
        ("test/engine/test_pool.py", "test/engine/test_reconnect.py", "test/engine/test_logging.py")
    ),
    # The liveness check's ping at every checkout (not only after 1 s idle): the reconnect tests,
    # pre-ping and handle_error verdicts among them, meet the project's own ping.
    "ping_every_checkout": Mode(("test/engine/test_reconnect.py",), {"liveness_ping_after": 0}),
}

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
TWO_PINGS = (
    "liveness_ping_after=0 pings at checkout, and pool_pre_ping=True pings again: the test counts "
    "one cursor() more than it expects"
)

_DEFAULTS = {
    "test/engine/test_reconnect.py::MockReconnectTest::test_conn_reusable": CONNECT_TIMEOUT,
    "test/engine/test_reconnect.py::PrePingMockTest::test_raise_db_is_stopped": GIVE_UP_ERROR,
}
_PING_EVERY_CHECKOUT = {
    **_DEFAULTS,
    "test/engine/test_reconnect.py::PrePingMockTest::test_ping_not_on_first_connect": TWO_PINGS,
    "test/engine/test_reconnect.py::PrePingMockTest::test_ping_not_on_reconnect": TWO_PINGS,
    "test/engine/test_reconnect.py::PrePingMockTest::test_pre_ping_weakref_finalizer": TWO_PINGS,
}

#: SQLAlchemy release series -> mode -> {test node id: reason}.
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    "2.1": {"defaults": _DEFAULTS, "ping_every_checkout": _PING_EVERY_CHECKOUT},
    "2.0": {"defaults": _DEFAULTS, "ping_every_checkout": _PING_EVERY_CHECKOUT},
}

"""Classification of connect failures, on exceptions rebuilt from a table captured from the drivers.

``tests/data/connect_errors.json`` was written by ``python -m tests.db.capture`` from real
failures of asyncpg and psycopg against a real server; ``tests/db/test_classify_live.py`` checks
the live drivers still raise what the table says.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from fault_tolerant_pool.classify import (
    Verdict,
    classify,
    classify_with,
    closed_by_proxy,
    sqlstate_of,
)

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "connect_errors.json").read_text()
)


def rebuild_link(link: dict[str, Any]) -> BaseException:
    target: Any = importlib.import_module(link["module"])
    for part in link["qualname"].split("."):
        target = getattr(target, part)
    if issubclass(target, OSError):
        if link.get("errno"):
            return target(link["errno"], link["strerror"])  # type: ignore[no-any-return]
        return target(link["message"])  # type: ignore[no-any-return]
    exc: BaseException = target(link["message"])
    if "sqlstate" in link and getattr(exc, "sqlstate", None) != link["sqlstate"]:
        exc.sqlstate = link["sqlstate"]  # type: ignore[attr-defined]
    return exc


def rebuild(chain: list[dict[str, Any]]) -> BaseException:
    """The outermost exception, wrapping the inner ones as the driver did (``orig`` or cause)."""
    inner: BaseException | None = None
    for link in reversed(chain):
        exc = rebuild_link(link)
        if inner is not None:
            if link["via"] == "orig":
                exc.orig = inner  # type: ignore[attr-defined]
            exc.__cause__ = inner
        inner = exc
    assert inner is not None
    return inner


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['driver']}-{c['case']}")
def test_captured_failures(case: dict[str, Any]) -> None:
    verdict = classify(rebuild(case["chain"]))
    assert verdict.transient is case["transient"]


EXPECTED_SQLSTATES = {
    "bad_password": "28P01",
    "unknown_database": "3D000",
    "role_connection_limit": "53300",
    "shutting_down": "57P03",
    "refused": None,
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['driver']}-{c['case']}")
def test_sqlstate_reported_or_inferred(case: dict[str, Any]) -> None:
    expected = EXPECTED_SQLSTATES.get(case["case"], "skip")
    if expected == "skip":
        return
    verdict = classify(rebuild(case["chain"]))
    if case["case"] == "refused" and case["driver"].startswith("psycopg"):
        expected = "08001"
    assert verdict.sqlstate == expected


def test_the_table_covers_both_drivers_and_the_sync_flavour() -> None:
    assert {c["driver"] for c in CASES} == {"asyncpg", "psycopg", "psycopg_async"}


class Sqlstated(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"server said {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        ("08000", True), ("08001", True), ("08006", True), ("08P01", True),
        ("57P01", True), ("57P02", True), ("57P03", True), ("53300", True), ("53400", True),
        ("28P01", False), ("28000", False), ("3D000", False), ("42501", False),
        ("0A000", False), ("XX000", False),
    ],
)  # fmt: skip
def test_sqlstate_table(code: str, transient: bool) -> None:
    verdict = classify(Sqlstated(code))
    assert (verdict.transient, verdict.sqlstate, verdict.error_type) == (transient, code, code)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (OSError(113, "No route to host"), True),
        (OSError(101, "Network is unreachable"), True),
        (TimeoutError(), True),
        (asyncio.TimeoutError(), True),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        (ssl.SSLError(1, "wrong version number"), False),
        (OSError(13, "Permission denied"), False),
        (ValueError("invalid dsn"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_os_level_failures(exc: BaseException, transient: bool) -> None:
    assert classify(exc).transient is transient


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("FATAL:  the database system is starting up", True),
        ("FATAL:  the database system is in recovery mode", True),
        ("FATAL:  sorry, too many clients already", True),
        ("FATAL:  remaining connection slots are reserved for superuser", True),
        ("server closed the connection unexpectedly", True),
        ("ERROR:  pgbouncer cannot connect to server", True),
        ("ERROR:  server login has been failing, try again later (server_login_retry)", True),
        ("FATAL:  no pg_hba.conf entry for host", False),
        ("FATAL:  role \"x\" does not exist", False),
        ("FATAL:  too many connections for database \"app\"", True),
        ("SSL error: certificate verify failed", False),
        ("something nobody has seen", False),
    ],
)
def test_psycopg_messages(message: str, transient: bool) -> None:
    import psycopg

    exc = psycopg.OperationalError(f'connection to server at "h", port 1 failed: {message}')
    assert classify(exc).transient is transient


def test_sqlstate_is_found_through_sqlalchemy_wrapping() -> None:
    inner = Sqlstated("57P01")
    outer = RuntimeError("wrapped")
    outer.orig = inner  # type: ignore[attr-defined]
    assert sqlstate_of(outer) == "57P01"


def test_user_classifier_first_then_the_table() -> None:
    refused = ConnectionRefusedError(111, "refused")
    assert classify_with(lambda e: None, refused).transient is True
    assert classify_with(lambda e: False, refused).transient is False
    assert classify_with(lambda e: True, ValueError("x")).transient is True
    assert classify_with(None, refused).transient is True


@pytest.mark.parametrize(
    "message",
    [
        "cannot call Transaction.rollback(): the underlying connection is closed",  # asyncpg
        "the connection is closed",  # psycopg
        "cannot switch to state 12; another operation (2) is in progress",  # asyncpg
    ],
)
def test_a_connection_closed_under_the_first_round_trip_is_transient(message: str) -> None:
    """What ``retry_ping`` meets when PgBouncer drops a fresh login (its server is down)."""

    class InterfaceError(Exception):
        pass

    verdict = classify(InterfaceError(message))
    assert verdict.transient and verdict.sqlstate in ("08003", "08006")


@pytest.mark.parametrize(
    "label, closed",
    [("08006", True), ("08P01", False), ("ConnectionError", True), ("ConnectionResetError", True),
     ("08001", False), ("ConnectionRefusedError", False), ("57P03", False), ("53300", False),
     ("28P01", False), ("TimeoutError", False)],
)  # fmt: skip
def test_closed_by_proxy_labels(label: str, closed: bool) -> None:
    verdict = Verdict(True, label, label) if label[0].isdigit() else Verdict(True, None, label)
    assert closed_by_proxy(verdict) is closed


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['driver']}-{c['case']}")
def test_captured_failures_of_a_direct_server_are_never_closed_by_a_proxy(
    case: dict[str, Any],
) -> None:
    # the real drivers' errors against PostgreSQL itself: refused, shutting down, authentication,
    # a missing database or role, a connection limit
    assert not closed_by_proxy(classify(rebuild(case["chain"])))


def test_libpq_and_asyncpg_closes_by_haproxy_are_closed_by_a_proxy() -> None:
    # the texts both drivers gave through HAProxy with no server (bench/patroni.py's logs)
    libpq = Exception(
        'connection failed: connection to server at "127.0.0.1", port 51005 failed: server '
        "closed the connection unexpectedly\n\tThis probably means the server terminated "
        "abnormally before or while processing the request."
    )
    assert closed_by_proxy(classify(libpq))
    assert closed_by_proxy(classify(ConnectionError("unexpected connection_lost() call")))

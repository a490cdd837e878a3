"""Which connect failures are transient: tables of SQLSTATEs, OS errors and server messages.

asyncpg reports a SQLSTATE for server errors at connect time; psycopg reports none there, so its
messages are matched. The messages are PostgreSQL's and PgBouncer's English texts: a server whose
``lc_messages`` is not English (``C`` or ``en_*``) makes psycopg's server-side failures permanent
unless a custom classifier is passed (see docs/retry.md).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CredentialsError

#: SQLSTATE classes whose every code is transient (class 08: connection exception).
TRANSIENT_SQLSTATE_CLASSES: frozenset[str] = frozenset({"08"})

#: Individual transient SQLSTATEs, with what they mean.
TRANSIENT_SQLSTATES: dict[str, str] = {
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "53300": "too_many_connections",
    "53400": "configuration_limit_exceeded",
}

#: SQLSTATEs that are named here only to document that they are permanent (never retried).
PERMANENT_SQLSTATES: dict[str, str] = {
    "28P01": "invalid_password",
    "28000": "invalid_authorization_specification",
    "3D000": "invalid_catalog_name",
    "42501": "insufficient_privilege",
}

#: errno values of transient socket failures (refused, reset, unreachable, timed out).
TRANSIENT_ERRNOS: frozenset[int] = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
    }
)

#: getaddrinfo failures that are temporary (the resolver may answer next time).
TRANSIENT_GAI_ERRORS: frozenset[int] = frozenset({socket.EAI_AGAIN})

#: Message fragments (lower case) that make a psycopg/libpq connect failure permanent, with the
#: SQLSTATE the server sent for them (None where the failure is the client's own).
#: Checked before the transient ones: every libpq text starts "connection ... failed".
PERMANENT_MESSAGES: tuple[tuple[str, str | None], ...] = (
    ("password authentication failed", "28P01"),
    ("sasl authentication failed", "28P01"),  # PgBouncer's word for a wrong password
    ("no password supplied", "28000"),
    ("no pg_hba.conf entry", "28000"),
    ('fatal:  database "', "3D000"),  # database "x" does not exist
    ('fatal:  role "', "28000"),  # role "x" does not exist (a dropped, rotated user)
    ("does not exist", None),  # role "x" does not exist (28000) and the like
    ("permission denied", "42501"),
    ("certificate verify failed", None),
    ("ssl error", None),
    ("invalid connection option", None),
    ("invalid integer value", None),
    ("invalid sslmode value", None),
    ('missing "=" after', None),
)

#: Message fragments (lower case) of transient connect failures, with the SQLSTATE they stand for.
TRANSIENT_MESSAGES: tuple[tuple[str, str | None], ...] = (
    ("the database system is starting up", "57P03"),
    ("the database system is shutting down", "57P03"),
    ("the database system is in recovery mode", "57P03"),
    ("the database system is not yet accepting connections", "57P03"),
    ("the database system is not accepting connections", "57P03"),
    ("terminating connection due to administrator command", "57P01"),
    ("terminating connection because of crash of another server process", "57P02"),
    ("sorry, too many clients already", "53300"),
    ("too many connections", "53300"),
    ("remaining connection slots are reserved", "53300"),
    ("connection refused", "08001"),
    ("connection reset by peer", "08006"),
    ("server closed the connection unexpectedly", "08006"),
    ("could not receive data from server", "08006"),
    ("could not send data to server", "08006"),
    ("no route to host", "08001"),
    ("network is unreachable", "08001"),
    ("connection timed out", "08001"),
    ("timeout expired", "08001"),
    ("temporary failure in name resolution", "08001"),
    ("consuming input failed", "08006"),
    # A connection closed under a just-opened connection's first round trip (retry_ping), e.g.
    # asyncpg's "cannot call Transaction.rollback(): the underlying connection is closed".
    ("connection is closed", "08003"),
    # asyncpg, when the connection is lost between two protocol states of that round trip.
    ("cannot switch to state", "08006"),
    # PgBouncer's own errors (it answers 08P01 for most of them).
    ("server login has been failing", "08P01"),
    ("pgbouncer cannot connect to server", "08P01"),
    ("no more connections allowed", "08P01"),
    ("database shutting down", "08P01"),
    ("server conn crashed", "08P01"),
    ("query_wait_timeout", "08P01"),
    ("client_login_timeout", "08P01"),
    ("pooler is shutting down", "08P01"),
    # libpq's target_session_attrs checks (psycopg): a host of the wrong kind, during a promotion
    # (the old primary read-only, the standby not yet promoted). Transient: the next host, or the
    # same host a moment later, may be the writer.
    ("session is read-only", None),
    ("session is not read-only", None),
    ("server is in hot standby mode", None),
    ("server is not in hot standby mode", None),
)

#: Driver exception classes (by name) of transient connect failures that carry no SQLSTATE.
TRANSIENT_CLASSES: dict[str, str] = {
    # asyncpg: every host answered and none matched target_session_attrs (no writable host yet).
    "TargetServerAttributeNotMatched": "no host matched target_session_attrs",
}

#: The connect failures where something accepted the TCP connection and ended it before any
#: database server spoke, by SQLSTATE (a server's, or inferred from libpq's words) or, without
#: one, by the driver's exception class: HAProxy or a cloud load balancer with no server to give
#: it (libpq's "server closed the connection unexpectedly", asyncpg's ``ConnectionError``
#: "unexpected connection_lost()", a reset). A direct PostgreSQL refuses (nothing listening) or
#: sends a message (57P03); it does not close a login unanswered. PgBouncer's own errors (08P01)
#: are not here: it authenticated the client before answering, which is work.
CLOSED_BY_PROXY: frozenset[str] = frozenset(
    {
        "08006",  # connection_failure (libpq: closed unexpectedly, reset, no data)
        "ConnectionError",  # asyncpg: connection_lost() during the handshake
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
    }
)

#: Labels of the failures that mean "this host is not of the kind asked for" (no writer yet).
NOT_MATCHING: tuple[str, ...] = (
    "TargetServerAttributeNotMatched",
    "session is read-only",
    "session is not read-only",
    "server is in hot standby mode",
    "server is not in hot standby mode",
)

#: A user classifier: True (transient), False (permanent) or None (ask the built-in table).
Classifier = Callable[[BaseException], "bool | None"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a connect failure is: transient or not, its SQLSTATE if known, and its metric label."""

    transient: bool
    sqlstate: str | None
    error_type: str


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (SQLAlchemy's ``.orig``, ``__cause__``), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8 and all(current is not s for s in seen):
        seen.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return seen


def innermost_class(exc: BaseException) -> str:
    """The class name of the driver's own exception under any SQLAlchemy wrapping."""
    return type(_chain(exc)[-1]).__name__


def sqlstate_of(exc: BaseException) -> str | None:
    """The first SQLSTATE found on the exception or on what it wraps."""
    for link in _chain(exc):
        for attr in ("sqlstate", "pgcode"):
            code = getattr(link, attr, None)
            if isinstance(code, str) and len(code) == 5:
                return code
    return None


def _sqlstate_is_transient(code: str) -> bool:
    return code[:2] in TRANSIENT_SQLSTATE_CLASSES or code in TRANSIENT_SQLSTATES


def _os_error_is_transient(exc: OSError) -> bool:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return False
    if isinstance(exc, socket.gaierror):
        return exc.errno in TRANSIENT_GAI_ERRORS
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    return exc.errno in TRANSIENT_ERRNOS


def _match(
    message: str, table: tuple[tuple[str, str | None], ...]
) -> tuple[str, str | None] | None:
    for row in table:
        if row[0] in message:
            return row
    return None


def classify(exc: BaseException) -> Verdict:
    """Classify a failed connect attempt with the built-in tables."""
    if isinstance(exc, CredentialsError):
        return Verdict(exc.transient, None, "CredentialsError")
    chain = _chain(exc)
    code = sqlstate_of(exc)
    label = code or type(chain[-1]).__name__
    if code is not None:
        return Verdict(_sqlstate_is_transient(code), code, label)
    for link in chain:
        if type(link).__name__ in TRANSIENT_CLASSES:
            return Verdict(True, None, type(link).__name__)
        if isinstance(link, OSError):
            return Verdict(_os_error_is_transient(link), None, type(link).__name__)
        if type(link).__name__ == "TimeoutError":  # asyncio.TimeoutError on Python 3.10
            return Verdict(True, None, "TimeoutError")
    message = " ".join(str(link) for link in chain).lower()
    permanent = _match(message, PERMANENT_MESSAGES)
    if permanent is not None:
        return Verdict(False, permanent[1], label)
    transient = _match(message, TRANSIENT_MESSAGES)
    if transient is not None:
        return Verdict(True, transient[1], label)
    return Verdict(False, None, label)


def closed_by_proxy(verdict: Verdict) -> bool:
    """Whether something accepted the connection and ended it before any database server
    spoke (:data:`CLOSED_BY_PROXY`): a proxy with no server to give it. Refused connections
    (nothing listening) and a server's own refusals are not."""
    code = verdict.sqlstate
    return (code if code is not None else verdict.error_type) in CLOSED_BY_PROXY


def not_matching(exc: BaseException) -> bool:
    """Whether a connect failed because the host is not of the kind ``target_session_attrs``
    asks for (read-only when a writer is wanted, and the like)."""
    text = " ".join(type(link).__name__ + " " + str(link) for link in _chain(exc))
    return any(fragment in text for fragment in NOT_MATCHING)


def classify_with(classifier: Classifier | None, exc: BaseException) -> Verdict:
    """Ask the user's classifier first; fall back to the tables when it answers None."""
    verdict = classify(exc)
    if classifier is None:
        return verdict
    answer = classifier(exc)
    if answer is None:
        return verdict
    return Verdict(bool(answer), verdict.sqlstate, verdict.error_type)

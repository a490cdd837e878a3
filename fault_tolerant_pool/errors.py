"""The error the application sees when connecting fails for good, and secret scrubbing."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeoutError

#: ``scheme://user:secret@host`` and ``password=secret`` (libpq key/value or query string).
_SECRET_PATTERNS = (
    re.compile(r"(?P<keep>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]*(?=@)", re.IGNORECASE),
    re.compile(r"(?P<keep>\bpassword\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,)]+)", re.IGNORECASE),
)
REDACTED = "***"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove passwords from a message: URL userinfo, ``password=`` pairs and any known secret."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group("keep") + REDACTED, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def one_line(text: str) -> str:
    """Fold a multi-line driver message (libpq adds hints on new lines) into one line."""
    return " ".join(text.split())


class ConnectRetriesExhausted(Exception):
    """Mixin marking the DBAPI ``OperationalError`` raised when a connect failed for good.

    The raised object is also an instance of the dialect's DBAPI ``OperationalError``, so
    SQLAlchemy wraps it as ``sqlalchemy.exc.OperationalError``; reach it as ``exc.orig``.
    """

    attempts: int
    elapsed: float
    last_error: BaseException
    transient: bool
    """False when the last error was permanent (never retried), True when retries ran out."""


class CredentialsError(Exception):
    """The ``credentials`` provider failed, was too slow, or answered something unusable.

    The message names the provider and never holds a secret. When a connect fails for good
    because of it, the application sees ``sqlalchemy.exc.OperationalError`` whose ``orig`` is a
    :class:`ConnectRetriesExhausted` with this error as ``last_error``.
    """

    def __init__(self, message: str, *, provider: str, transient: bool = False) -> None:
        super().__init__(message)
        self.provider = provider
        self.transient = transient
        """True when the provider failed for a reason worth retrying (refused socket, timeout)."""


class DatabaseUnreachable(ConnectRetriesExhausted):
    """Mixin marking the DBAPI ``OperationalError`` of a connect refused at once (fail-fast):
    the pool has been unable to connect for a whole ``retry_deadline`` and a probe retries.

    Like every :class:`ConnectRetriesExhausted` it is an instance of the dialect's DBAPI
    ``OperationalError`` (the application sees ``sqlalchemy.exc.OperationalError``).
    ``attempts`` and ``elapsed`` are this caller's (usually 0 attempts); ``last_error`` is the
    outage's latest failure.
    """

    unreachable_since: float
    """Seconds since the epoch (``time.time()``) when connecting began to fail."""
    outage_attempts: int
    """Failed attempts since then (the probe's, mostly)."""


class TooManyWaiting(PoolTimeoutError):
    """A checkout refused at once: ``max_waiting`` callers were already waiting for a slot or
    for the probe. A subclass of SQLAlchemy's pool ``TimeoutError``, so code that answers pool
    exhaustion (a 503) answers this too."""

    def __init__(self, message: str, *, max_waiting: int) -> None:
        super().__init__(message)
        self.max_waiting = max_waiting


def too_many_waiting(max_waiting: int, what: str) -> TooManyWaiting:
    return TooManyWaiting(
        f"{max_waiting} caller{'s' if max_waiting != 1 else ''} already waiting for {what} "
        f"(max_waiting={max_waiting}): checkout refused at once",
        max_waiting=max_waiting,
    )


_subclasses: dict[tuple[type[BaseException], type[BaseException]], type[Any]] = {}
_subclasses_lock = threading.Lock()


def _subclass_for(
    operational_error: type[BaseException], mixin: type[ConnectRetriesExhausted]
) -> type[Any]:
    with _subclasses_lock:
        key = (operational_error, mixin)
        cls = _subclasses.get(key)
        if cls is None:
            cls = type(mixin.__name__, (mixin, operational_error), {"__module__": __name__})
            _subclasses[key] = cls
        return cls


def _operational(dbapi: Any) -> type[BaseException]:
    operational = getattr(dbapi, "OperationalError", None)
    return operational if isinstance(operational, type) else OSError


def _copy_sqlstate(error: BaseException, last_error: BaseException) -> None:
    sqlstate = getattr(last_error, "sqlstate", None)
    if sqlstate is not None:
        for attr in ("sqlstate", "pgcode"):
            with contextlib.suppress(AttributeError):  # read-only on some drivers' errors
                setattr(error, attr, sqlstate)


def exhausted_error(
    dbapi: Any,
    *,
    attempts: int,
    elapsed: float,
    last_error: BaseException,
    transient: bool,
    error_type: str,
    secrets: tuple[str, ...] = (),
    hosts: str = "",
) -> ConnectRetriesExhausted:
    """Build the DBAPI-level ``OperationalError`` for a connect that failed for good."""
    detail = one_line(redact(str(last_error), secrets)) or type(last_error).__name__
    why = "retries exhausted" if transient else "permanent error, not retried"
    message = (
        f"could not connect after {attempts} attempt{'s' if attempts != 1 else ''} "
        f"in {elapsed:.2f}s ({why}); last error {type(last_error).__name__} "
        f"[{error_type}]: {detail}"
    )
    if hosts:
        message += f"; {hosts}"
    error: ConnectRetriesExhausted = _subclass_for(_operational(dbapi), ConnectRetriesExhausted)(
        message
    )
    error.attempts = attempts
    error.elapsed = elapsed
    error.last_error = last_error
    error.transient = transient
    _copy_sqlstate(error, last_error)
    return error


def unreachable_message(
    *,
    since: float,
    outage_attempts: int,
    last_error: BaseException,
    error_type: str,
    secrets: tuple[str, ...] = (),
) -> str:
    """The message of a fail-fast connect (built once per failed probe, not per caller)."""
    detail = one_line(redact(str(last_error), secrets)) or type(last_error).__name__
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    return (
        f"database unreachable since {stamp} ({outage_attempts} failed "
        f"attempt{'s' if outage_attempts != 1 else ''}): failing fast while a probe retries; "
        f"last error {type(last_error).__name__} [{error_type}]: {detail}"
    )


def unreachable_error(
    dbapi: Any,
    message: str,
    *,
    since: float,
    outage_attempts: int,
    attempts: int,
    elapsed: float,
    last_error: BaseException,
) -> DatabaseUnreachable:
    """Build the DBAPI-level ``OperationalError`` of a fail-fast connect."""
    error: DatabaseUnreachable = _subclass_for(_operational(dbapi), DatabaseUnreachable)(message)
    error.attempts = attempts
    error.elapsed = elapsed
    error.last_error = last_error
    error.transient = True
    error.unreachable_since = since
    error.outage_attempts = outage_attempts
    _copy_sqlstate(error, last_error)
    return error

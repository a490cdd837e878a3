"""The error the application sees when connecting fails for good, and secret scrubbing."""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any

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


_subclasses: dict[type[BaseException], type[ConnectRetriesExhausted]] = {}
_subclasses_lock = threading.Lock()


def _subclass_for(operational_error: type[BaseException]) -> type[ConnectRetriesExhausted]:
    with _subclasses_lock:
        cls = _subclasses.get(operational_error)
        if cls is None:
            cls = type(
                "ConnectRetriesExhausted",
                (ConnectRetriesExhausted, operational_error),
                {"__module__": __name__},
            )
            _subclasses[operational_error] = cls
        return cls


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
    operational = getattr(dbapi, "OperationalError", None)
    base = operational if isinstance(operational, type) else OSError
    error = _subclass_for(base)(message)
    error.attempts = attempts
    error.elapsed = elapsed
    error.last_error = last_error
    error.transient = transient
    sqlstate = getattr(last_error, "sqlstate", None)
    if sqlstate is not None:
        for attr in ("sqlstate", "pgcode"):
            with contextlib.suppress(AttributeError):  # read-only on some drivers' errors
                setattr(error, attr, sqlstate)
    return error

"""Credentials asked for every physical connect: the provider, its cache, and the way to the driver.

The pool asks a provider (a sync or async callable, or an object with ``get_credentials()``) for
the secret of the next physical connection, caches the answer until shortly before its expiry
when it has one, and hands it to the driver through the dialect's ``do_connect`` event: the
secret is never frozen into the pool's creator. The retry loop (``connector.py``) drops the cache
and asks again, once, when the server refuses a login.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import inspect
import json
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import event
from sqlalchemy.exc import ArgumentError
from sqlalchemy.util import await_only

from .classify import _os_error_is_transient
from .errors import CredentialsError, one_line, redact
from .notes import notes_of
from .stats import ConnectCounters

#: SQLSTATEs of a refused login: the cached secret may be stale, so it is fetched again once.
AUTH_FAILURE_SQLSTATES: frozenset[str] = frozenset({"28P01", "28000"})

#: A cached answer is refreshed this many seconds before it expires...
REFRESH_MARGIN = 60.0
#: ...but never earlier than this share of its lifetime before (short-lived tokens stay cached).
REFRESH_MARGIN_SHARE = 0.25

#: How many recent passwords are remembered to scrub them from messages.
_KNOWN_SECRETS = 3

Answer = str | Mapping[str, Any]
"""What a provider returns: a password (or token), or a mapping with ``password`` and optionally
``user`` (or ``username``) and an expiry: ``expires_at`` (seconds since the epoch, or an aware
``datetime``; a naive one is taken as UTC) or ``expires_in`` (seconds from now)."""


@runtime_checkable
class CredentialsProvider(Protocol):
    """A provider object: ``get_credentials()`` returns an :data:`Answer` or an awaitable of one.

    Optional attributes: ``name`` (used in error messages instead of the class name) and
    ``blocking`` (True: an async engine calls it in a worker thread so the loop never waits).
    """

    def get_credentials(self) -> Answer | Awaitable[Answer]: ...


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """One answer of the provider, as the pool uses it."""

    password: str
    user: str | None
    refresh_at: float
    """Until when (the source's clock) the answer is served from the cache; -inf: never."""

    def __repr__(self) -> str:
        return f"Secret(user={self.user!r}, password='***')"


def provider_name(provider: object) -> str:
    """How a provider is named in messages: its ``name``, else its qualified name or class."""
    name = getattr(provider, "name", None)
    if isinstance(name, str) and name:
        return name
    qualname = getattr(provider, "__qualname__", None)
    if isinstance(qualname, str):
        return f"{getattr(provider, '__module__', None) or '?'}.{qualname}"
    kind = type(provider)
    return f"{kind.__module__}.{kind.__qualname__} instance"


def coerce_provider(value: Any) -> Any:
    """Validate the ``credentials`` argument: a callable, a provider object or ``"module:attr"``."""
    if value is None:
        return None
    if isinstance(value, str):
        module_name, _, attribute = value.partition(":")
        if not module_name or not attribute:
            raise ArgumentError(
                f"credentials must be a callable, a provider object or a 'module:attribute' "
                f"string, got {value!r}"
            )
        try:
            value = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ArgumentError(f"credentials: cannot import {value!r}: {error}") from None
    if isinstance(value, CredentialsProvider) or callable(value):
        return value
    raise ArgumentError(
        "credentials must be a callable or an object with get_credentials(), "
        f"got {type(value).__name__}"
    )


def _expiry(answer: Mapping[str, Any], now: float) -> float | None:
    """The answer's expiry as seconds since the epoch, or None; ValueError if malformed."""
    expires_in = answer.get("expires_in")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise ValueError("expires_in must be a number of seconds")
        return now + float(expires_in)
    expires_at = answer.get("expires_at")
    if expires_at is None:
        return None
    if isinstance(expires_at, datetime.datetime):
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=datetime.timezone.utc)
        return expires_at.timestamp()
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise ValueError("expires_at must be seconds since the epoch or a datetime")
    return float(expires_at)


def _refresh_at(expires: float | None, now: float) -> float:
    if expires is None:
        return -math.inf
    margin = min(REFRESH_MARGIN, REFRESH_MARGIN_SHARE * max(expires - now, 0.0))
    return expires - margin


class CredentialSource:
    """A provider behind a cache; one per engine, carried across ``engine.dispose()``.

    Concurrent connects that find the cache empty share one provider call. An async provider is
    awaited on the event loop (inside SQLAlchemy's greenlet bridge); a provider marked
    ``blocking`` runs in a worker thread for async engines. Every wait is bounded by the time
    left before the retry deadline.
    """

    def __init__(
        self,
        provider: Any,
        counters: ConnectCounters,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.name = provider_name(provider)
        ask = getattr(provider, "get_credentials", None)
        self._ask: Callable[[], Any] = ask if callable(ask) else provider
        self._blocking = bool(getattr(provider, "blocking", False))
        self._counters = counters
        self._clock = clock
        self._cached: Secret | None = None
        self._last: Secret | None = None
        self._refused: Secret | None = None
        self._fetches = 0
        self._known: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._inflight: asyncio.Task[Secret] | None = None

    def secrets(self) -> tuple[str, ...]:
        """The recent passwords, for scrubbing them from messages and log lines."""
        return self._known

    def get(self, *, in_loop: bool, timeout: float) -> Secret:
        """The secret for the next connect: cached while fresh, else asked of the provider.

        ``in_loop``: the caller runs inside SQLAlchemy's greenlet bridge (an async engine).
        ``timeout``: seconds left before the retry deadline.
        """
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at:
            return cached
        if in_loop:
            return self._get_in_loop(timeout)
        return self._get_in_thread(timeout)

    def refused(self, secret: Secret) -> None:
        """The server refused ``secret``: forget it, so that the next :meth:`get` asks again.

        Counted once per refused answer, however many connects it failed at the same time.
        """
        if secret is self._refused:
            return
        self._refused = secret
        if self._cached is secret:
            self._cached = None
        self._counters.credentials_refreshed()

    # -- asking the provider -----------------------------------------------------------------

    def _get_in_thread(self, timeout: float) -> Secret:
        fetches = self._fetches
        if not self._lock.acquire(True, max(timeout, 0.0)):
            raise self._error(f"did not answer within {timeout:.2f}s", TimeoutError())
        try:
            last = self._last
            if self._fetches != fetches and last is not None:
                return last  # answered while this thread waited for the lock
            cached = self._cached
            if cached is not None and self._clock() < cached.refresh_at:
                return cached
            answer = self._call()
            if inspect.isawaitable(answer):
                answer = self._run_to_completion(answer, timeout)
            return self._store(answer)
        finally:
            self._lock.release()

    def _run_to_completion(self, awaitable: Awaitable[Any], timeout: float) -> Any:
        """An async provider used by a sync engine: run it on a private event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise self._error(
                "is async, but a sync engine asked for it from a thread running an event loop",
                None,
            )

        async def settle() -> Any:
            return await asyncio.wait_for(_awaited(awaitable), max(timeout, 0.0))

        try:
            return asyncio.run(settle())
        except asyncio.TimeoutError as error:
            raise self._error(f"did not answer within {timeout:.2f}s", error) from None
        except Exception as error:
            raise self._error("failed", error) from error

    def _get_in_loop(self, timeout: float) -> Secret:
        task = self._inflight
        loop = asyncio.get_running_loop()
        if task is None or task.get_loop() is not loop:  # none yet, or one of a former loop
            if not self._blocking:
                answer = self._call()  # a sync provider answers here and now
                if not inspect.isawaitable(answer):
                    return self._store(answer)
                pending: Awaitable[Any] = answer
            else:
                pending = asyncio.to_thread(self._call)
            task = loop.create_task(self._settle(pending))
            task.add_done_callback(self._landed)
            self._inflight = task
        try:
            return await_only(asyncio.wait_for(asyncio.shield(task), max(timeout, 0.0)))
        except asyncio.TimeoutError as error:
            raise self._error(f"did not answer within {timeout:.2f}s", error) from None
        except CredentialsError as error:  # shared by every waiter: raise a copy of our own
            raise CredentialsError(
                str(error), provider=error.provider, transient=error.transient
            ) from error.__cause__

    async def _settle(self, pending: Awaitable[Any]) -> Secret:
        try:
            answer = await pending
        except CredentialsError:
            raise
        except Exception as error:
            raise self._error("failed", error) from error
        return self._store(answer)

    def _landed(self, task: asyncio.Task[Secret]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled meanwhile

    def _call(self) -> Any:
        self._counters.credentials_fetched()
        try:
            return self._ask()
        except Exception as error:
            raise self._error("failed", error) from error

    def _store(self, answer: Any) -> Secret:
        now = self._clock()
        secret = self._coerce(answer, now)
        self._cached = secret
        self._last = secret
        self._fetches += 1
        if secret.password not in self._known:
            self._known = (secret.password, *self._known)[:_KNOWN_SECRETS]
        return secret

    def _coerce(self, answer: Any, now: float) -> Secret:
        if isinstance(answer, str):
            if not answer:
                raise self._error("returned an empty password", None)
            return Secret(answer, None, -math.inf)
        if not isinstance(answer, Mapping):
            raise self._error(
                f"returned a {type(answer).__name__}; expected a password string or a mapping "
                "with 'password'",
                None,
            )
        password = answer.get("password")
        user = answer.get("user", answer.get("username"))
        if not isinstance(password, str) or not password:
            raise self._error("returned a mapping without a non-empty 'password' string", None)
        if user is not None and (not isinstance(user, str) or not user):
            raise self._error("returned a 'user' that is not a non-empty string", None)
        try:
            expires = _expiry(answer, now)
        except ValueError as error:
            raise self._error(f"returned a bad expiry: {error}", None) from None
        return Secret(password, user, _refresh_at(expires, now))

    def _error(self, what: str, cause: BaseException | None) -> CredentialsError:
        message = f"credentials provider {self.name} {what}"
        transient = False
        if cause is not None:
            detail = one_line(redact(str(cause), self._known))
            if what == "failed":
                message += f": {type(cause).__name__}" + (f": {detail}" if detail else "")
            transient = isinstance(cause, TimeoutError | asyncio.TimeoutError) or (
                isinstance(cause, OSError) and _os_error_is_transient(cause)
            )
        return CredentialsError(message, provider=self.name, transient=transient)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


# -- the way to the driver: the dialect's do_connect event ---------------------------------------


def offer(record: Any, secret: Secret) -> None:
    """Leave ``secret`` in the notes of the pool's connection record for
    :func:`apply_credentials`."""
    notes_of(record).offer = secret


def withdraw(record: Any) -> Secret | None:
    """Take back an offered secret; not None means the dialect never applied it."""
    notes = notes_of(record)
    result: Secret | None = notes.offer
    notes.offer = None
    return result


def apply_credentials(
    dialect: Any, connection_record: Any, cargs: list[Any], cparams: dict[str, Any]
) -> None:
    """``do_connect`` listener: put the offered user and password into this connect's arguments.

    SQLAlchemy passes a copy of the connect arguments per call, so concurrent connects with
    different secrets never see each other's. Returns None: later listeners still run.
    """
    notes = getattr(connection_record, "notes", None)  # None: a record given no offer
    if notes is None:
        return
    secret: Secret | None = notes.offer
    if secret is not None:
        notes.offer = None
        if secret.user is not None:
            cparams["user"] = secret.user
        cparams["password"] = secret.password


def install(dialect: Any) -> None:
    """Listen to the dialect's ``do_connect`` once (a recreated pool shares the dialect)."""
    if not event.contains(dialect, "do_connect", apply_credentials):
        event.listen(dialect, "do_connect", apply_credentials)


# -- built-in providers ----------------------------------------------------------------------------


class FileCredentials:
    """Reads the secret from a file and reads it again whenever the file changes.

    For Vault Agent templates and Kubernetes secret volumes (whose files are swapped atomically
    through a symlink, so a change shows as a new inode). The file holds either the password
    (one trailing newline is ignored) or a JSON object with ``password`` and optionally
    ``user``/``username`` and ``expires_at``/``expires_in``. ``user_path`` names a second file
    holding the user name (Kubernetes keeps one key per file); ``user`` fixes it instead.
    A change is noticed by a ``stat()`` per physical connect; the content is read only then.
    """

    blocking = False

    def __init__(
        self, path: str | os.PathLike[str], *, user_path: str | os.PathLike[str] | None = None,
        user: str | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        self.user_path = Path(user_path) if user_path is not None else None
        self.user = user
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._answer: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"FileCredentials({str(self.path)!r})"

    def __repr__(self) -> str:
        return self.name

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        paths = (self.path,) if self.user_path is None else (self.path, self.user_path)
        stamps = []
        for path in paths:
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def get_credentials(self) -> dict[str, Any]:
        stamp = self._stat()
        if stamp != self._stamp:
            self._answer = self._read()
            self._stamp = stamp
        return self._answer

    def _read(self) -> dict[str, Any]:
        text = self.path.read_text(encoding="utf-8")
        answer: dict[str, Any]
        if text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                raise ValueError(f"{self.path} starts with '{{' but is not valid JSON") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"{self.path} holds JSON that is not an object")
            answer = dict(parsed)
        else:
            answer = {"password": text.removesuffix("\n").removesuffix("\r")}
        if self.user_path is not None:
            answer["user"] = self.user_path.read_text(encoding="utf-8").strip()
        elif self.user is not None:
            answer["user"] = self.user
        return answer

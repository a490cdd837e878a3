"""Per-attempt connect timeouts: no connect attempt may outlive the retry deadline.

A black-holed server (packets dropped, or a proxy that accepts and never answers) makes a connect
wait for the driver's own timeout: asyncpg 60 s, psycopg 130 s, libpq forever. So every attempt
the pool makes is given a time limit, ``retry_attempt_timeout`` clamped to the time left before
``retry_deadline``, and the driver is told through its own connect timeout. The pool's
``do_connect`` listener writes it into the connect arguments of that one attempt; the retry loop
publishes the limit in a context variable just before calling the creator. With
``retry_attempt_timeout=None`` the driver is told nothing: its own connect timeout (or the
user's ``connect_args``) applies, as with a stock pool, and the deadline only stops the retries.

Drivers differ in what they can honour (the table :data:`CONNECT_TIMEOUTS`):

- asyncpg takes a float ``timeout``: exact.
- psycopg async: its ``connect_timeout`` is whole seconds, at least 2 (psycopg's
  ``timeout_from_conninfo``), and bounds the login only, not the host name's resolution. A
  limit it can honour exactly (a whole number of seconds, at least 2, with a host given as an
  address or a socket directory: the first attempt with the defaults) is passed to it; any other
  the pool enforces itself, running ``AsyncConnection.connect`` under a deadline of its own
  (``async_creator_fn``; :func:`_bounded`). Exact either way; the first costs nothing, since
  psycopg times every connect anyway.
- psycopg sync and psycopg2 (libpq): ``connect_timeout`` in whole seconds, at least 2. The pool
  passes the limit rounded down (never past the deadline while 2 s or more are left). When an
  attempt ran into its time limit and less than 2 s are left, no further attempt is made: it
  could not end by the deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import event

from .hosts import Host, narrow

#: An attempt is never given less than this, even at the deadline: a server that answers at once
#: can still be reached by the last attempt.
MIN_ATTEMPT_TIMEOUT = 0.5
#: An attempt that lasted this share of what the driver was told to wait has run into its limit.
_RAN_OUT = 0.9
#: Rounding down to whole seconds forgives this much (2.999 s left still makes 3 s).
_ROUNDING_SLACK = 0.01

_current: ContextVar[AttemptTimer | None] = ContextVar("fault_tolerant_pool_attempt", default=None)


def attempt_timeout() -> float | None:
    """Seconds the connect attempt in progress may take, or None outside one (and with
    ``retry_attempt_timeout=None``).

    For a custom ``creator``/``async_creator`` (which bypasses ``do_connect``): pass it to your
    driver's connect so a black-holed attempt ends by the retry deadline too.
    """
    timer = _current.get()
    return None if timer is None or timer.cap is None else timer.limit


def _seconds(value: Any) -> float | None:
    """A user's connect timeout (number or string); None when unset or "wait forever" (<= 0)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None  # the driver will complain about it in its own words
    return seconds if seconds > 0 and math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class ConnectTimeout:
    """How one driver is told to give up a connect, and what it can honour.

    ``keyword`` is the connect argument; None means the pool bounds the async creator itself
    (see :func:`_bounded`). ``whole_seconds`` and ``minimum`` are the driver's rounding.
    """

    keyword: str | None
    whole_seconds: bool = False
    minimum: float = 0.0
    environ: str | None = None
    """An environment variable the driver reads its default from (libpq's ``PGCONNECT_TIMEOUT``)."""
    exact: bool = False
    """A limit the driver cannot honour exactly is enforced by the pool around the async creator
    (psycopg async), so the driver waits exactly as long as asked."""

    def bound(self, seconds: float) -> float:
        """How long the driver will wait when asked to wait at most ``seconds``."""
        if self.exact:
            return seconds
        if self.whole_seconds:
            seconds = math.floor(seconds + _ROUNDING_SLACK)
        return max(self.minimum, seconds)

    def apply(self, cparams: dict[str, Any], seconds: float) -> float:
        """Write the limit into one attempt's connect arguments (a smaller one of yours stays).

        Returns how long the driver will wait.
        """
        keyword = self.keyword
        if keyword is None:
            return _bound_creator(cparams, seconds)
        mine = _seconds(cparams.get(keyword))
        if mine is None and self.environ is not None:
            mine = _seconds(_environ(self.environ))
        if mine is not None:
            seconds = min(seconds, mine)
        if self.exact and not self._honours(seconds, cparams):
            return _bound_creator(cparams, seconds)
        bound = self.bound(seconds)
        cparams[keyword] = int(bound) if self.whole_seconds else bound
        return bound

    def _honours(self, seconds: float, cparams: dict[str, Any]) -> bool:
        """Whether the driver waits exactly ``seconds``, and for nothing before the login."""
        if self.whole_seconds:
            whole = math.floor(seconds + _ROUNDING_SLACK)
            if whole < self.minimum or abs(seconds - whole) > _ROUNDING_SLACK:
                return False
        return _resolves_nothing(cparams.get("host"))


def _environ(name: str) -> str | None:
    """``os.environ.get(name)``, read as the driver reads it (at each connect), without the
    ``KeyError`` that ``os.environ.get`` raises and catches inside when the variable is unset:
    behind ``NullPool`` every checkout asks, and that cost a few microseconds there."""
    read = _environ_readers.get(name)
    if read is None:
        read = _environ_readers[name] = _environ_reader(name)
    return read()


def _environ_reader(name: str) -> Callable[[], str | None]:
    environ = os.environ
    data = getattr(environ, "_data", None)  # CPython's os._Environ: the encoded mapping
    encodekey = getattr(environ, "encodekey", None)
    decodevalue = getattr(environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: environ.get(name)
    key = encodekey(name)

    def read() -> str | None:
        value = data.get(key)
        return None if value is None else str(decodevalue(value))

    return read


_environ_readers: dict[str, Callable[[], str | None]] = {}


def _bound_creator(cparams: dict[str, Any], seconds: float) -> float:
    """Run this attempt's async creator under a deadline of the pool's own (psycopg async)."""
    connect = cparams.get("async_creator_fn") or _psycopg_async_connect()
    cparams["async_creator_fn"] = _bounded(connect, seconds)
    return seconds


_literal_hosts: dict[str, bool] = {}  # host -> an address or a socket directory (no lookup)


def _resolves_nothing(host: Any) -> bool:
    """Whether a connect to ``host`` starts without a name lookup: an IP address, a socket
    directory, or none given (libpq's default socket). A lookup is not covered by psycopg's
    ``connect_timeout``."""
    if host is None:
        return True
    known = _literal_hosts.get(host)
    if known is None:
        known = isinstance(host, str) and _is_literal(host)
        if len(_literal_hosts) < 64:  # a pool connects to a few hosts; never grows without end
            _literal_hosts[host] = known
    return known


def _is_literal(host: str) -> bool:
    if host.startswith("/") or host.startswith("@"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_LIBPQ = ConnectTimeout(
    "connect_timeout", whole_seconds=True, minimum=2.0, environ="PGCONNECT_TIMEOUT"
)

#: (SQLAlchemy driver name, is the dialect async) -> how that driver takes a connect timeout.
#: Drivers not listed get no per-attempt timeout (docs/retry.md says so).
CONNECT_TIMEOUTS: dict[tuple[str, bool], ConnectTimeout] = {
    ("asyncpg", True): ConnectTimeout("timeout"),
    ("psycopg", True): ConnectTimeout(
        "connect_timeout", whole_seconds=True, minimum=2.0, environ="PGCONNECT_TIMEOUT", exact=True
    ),
    ("psycopg", False): _LIBPQ,
    ("psycopg2", False): _LIBPQ,
    ("pg8000", False): ConnectTimeout("timeout"),
}


def connect_timeout_for(dialect: Any) -> ConnectTimeout | None:
    """The table's row for a dialect, or None."""
    return CONNECT_TIMEOUTS.get(
        (getattr(dialect, "driver", ""), bool(getattr(dialect, "is_async", False)))
    )


_psycopg_connect: Callable[..., Any] | None = None


def _psycopg_async_connect() -> Callable[..., Any]:
    global _psycopg_connect
    if _psycopg_connect is None:  # imported once, not on every attempt
        import psycopg

        _psycopg_connect = psycopg.AsyncConnection.connect
    return _psycopg_connect


class _Task(Protocol):
    """What a deadline uses of its task (an ``asyncio.Task`` of Python 3.11+)."""

    def cancel(self) -> bool: ...

    def cancelling(self) -> int: ...

    def uncancel(self) -> int: ...


class _Deadline:
    """The time limit of one attempt in flight, in its task (see :class:`_Deadlines`)."""

    __slots__ = ("at", "cancelling", "expired", "task")

    def __init__(self, task: _Task, at: float) -> None:
        self.task = task
        self.at = at
        self.cancelling = task.cancelling()  # cancellations requested before the attempt
        self.expired = False


class _Deadlines:
    """The time limits of the attempts in flight on one event loop, kept by one timer armed for
    the earliest of them: an attempt costs a dict entry. (``asyncio.timeout`` schedules and
    cancels a timer of its own per attempt, and the loop pops every cancelled one off its heap:
    behind ``NullPool``, where every checkout connects, that showed in the throughput.)

    The rules are ``asyncio.timeout``'s: at its deadline the attempt's task is cancelled; the
    attempt timed out when that cancellation ends it and no other one was requested meanwhile.
    Used from its loop's thread only.
    """

    __slots__ = ("armed", "attempts", "handle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.attempts: dict[_Deadline, None] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.armed = math.inf  # when the timer fires (inf: not armed)

    def enter(self, task: _Task, seconds: float) -> _Deadline:
        deadline = _Deadline(task, self.loop.time() + seconds)
        self.attempts[deadline] = None
        if deadline.at < self.armed:
            self._arm(deadline.at)
        return deadline

    def leave(self, deadline: _Deadline) -> bool:
        """The attempt ended: True when it timed out (its deadline cancelled its task, and that
        is the only cancellation pending, which is taken back here)."""
        if not deadline.expired:
            del self.attempts[deadline]
            return False
        return deadline.task.uncancel() <= deadline.cancelling

    def _arm(self, at: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed = at
        self.handle = self.loop.call_at(at, self._expire)

    def _expire(self) -> None:
        due = max(self.armed, self.loop.time())  # the loop may run a timer a tick early
        self.handle = None
        self.armed = math.inf
        attempts = self.attempts
        for deadline in [d for d in attempts if d.at <= due]:
            del attempts[deadline]
            deadline.expired = True
            deadline.task.cancel()
        if attempts:  # the next one (an attempt that ended early left its entry already)
            self._arm(min(d.at for d in attempts))


_deadlines: _Deadlines | None = None  # the running loop's, most likely


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    """The watch of ``loop``'s attempts (a new one when the last one used was another loop's:
    attempts keep the watch they entered, so a swap costs a timer, never a deadline)."""
    global _deadlines
    deadlines = _deadlines
    if deadlines is None or deadlines.loop is not loop:
        deadlines = _deadlines = _Deadlines(loop)
    return deadlines


def _bounded(connect: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """An async creator that gives up after ``seconds`` (raising ``TimeoutError``).

    The connect runs in the caller's task, under the loop's :class:`_Deadlines` (Python 3.11+,
    ``asyncio.timeout``'s rules with one timer for all attempts): ``asyncio.wait_for`` runs it
    in a task of its own and, cancelled at the moment that task finishes, drops the new
    connection unclosed. Python 3.10 has only ``wait_for`` (also used outside a task).
    """
    if sys.version_info < (3, 11):
        return _waited(connect, seconds)

    async def creator(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if task is None:
            return await _waited(connect, seconds)(*args, **kwargs)
        loop = task.get_loop()
        deadlines = _deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = _deadlines_of(loop)
        deadline = deadlines.enter(task, seconds)
        try:
            connection = await connect(*args, **kwargs)
        except BaseException as error:
            if deadlines.leave(deadline) and isinstance(error, asyncio.CancelledError):
                release_frames(error)  # the driver's CancelledError
                raise _timed_out(seconds) from None
            raise
        deadlines.leave(deadline)
        return connection

    return creator


def _waited(connect: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """:func:`_bounded` with ``asyncio.wait_for`` (its own task)."""

    async def creator(*args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.wait_for(connect(*args, **kwargs), seconds)
        except asyncio.TimeoutError as timeout:
            release_frames(timeout)
            if timeout.__context__ is not None:  # the driver's CancelledError
                release_frames(timeout.__context__)
            raise _timed_out(seconds) from None

    return creator


def _timed_out(seconds: float) -> TimeoutError:
    return TimeoutError(f"connect attempt timed out after {seconds:.3g}s")


def release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames ``error`` went through.

    A failed connect must not keep its half-open socket: psycopg holds a timed-out attempt's
    connection in a reference cycle (its connect frame -> the attempt's error -> its traceback
    -> that frame), which only the garbage collector would break, leaving the server a
    half-open login until its ``authentication_timeout``. Frames still running are left alone.
    """
    traceback.clear_frames(error.__traceback__)


_last_rule: tuple[Any, ConnectTimeout | None] = (None, None)  # a dialect and its row


def _inject(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
    """``do_connect`` listener: give this attempt the driver's connect timeout."""
    global _last_rule
    timer = _current.get()
    if timer is not None:
        if timer.host is not None:
            narrow(cparams, timer.host)
        if timer.cap is None:
            return  # retry_attempt_timeout=None: tell the driver nothing
        last, rule = _last_rule
        if last is not dialect:  # looked up once per dialect in a row, not per attempt
            rule = connect_timeout_for(dialect)
            _last_rule = (dialect, rule)
        if rule is not None:
            timer.told(rule, rule.apply(cparams, timer.limit))


def install(dialect: Any) -> None:
    """Listen to the dialect's ``do_connect`` (once) if the driver is in the table."""
    if connect_timeout_for(dialect) is not None and not event.contains(
        dialect, "do_connect", _inject
    ):
        event.listen(dialect, "do_connect", _inject)


def attempt_limit(cap: float | None, remaining: float) -> float:
    """The time limit of an attempt that starts ``remaining`` seconds before the deadline, with
    ``retry_attempt_timeout`` ``cap`` (None: only the deadline bounds it)."""
    limit = remaining if cap is None else min(cap, remaining)
    return max(limit, MIN_ATTEMPT_TIMEOUT)


class AttemptTimer:
    """The time limits of one connect's attempts; pure, given clock readings.

    ``cap`` is ``retry_attempt_timeout`` (None: the driver is told nothing). While an attempt
    runs, the timer is published in a context variable; the ``do_connect`` listener reads the
    limit and tells the timer what the driver was told (:meth:`told`). Made with ``started``
    and ``limit``, it is already begun (a connect's first attempt: no :meth:`begin` call).
    """

    __slots__ = ("cap", "host", "limit", "rule", "started", "waits")

    def __init__(self, cap: float | None, started: float = 0.0, limit: float = 0.0) -> None:
        self.cap = cap
        self.host: Host | None = None
        """The one host of a multi-host URL this attempt goes to (see :mod:`.hosts`)."""
        self.started = started
        self.limit = limit
        self.rule: ConnectTimeout | None = None
        self.waits: float | None = None  # what the driver was told to wait in this attempt

    def limit_for(self, remaining: float) -> float:
        """The limit of an attempt that starts with ``remaining`` seconds before the deadline."""
        return attempt_limit(self.cap, remaining)

    def begin(self, now: float, remaining: float, most: float | None = None) -> float:
        """An attempt starts now (taking at most ``most`` seconds, if given); returns its limit."""
        self.started = now
        limit = self.limit_for(remaining)
        self.limit = limit if most is None else max(min(limit, most), MIN_ATTEMPT_TIMEOUT)
        self.waits = None
        return self.limit

    def told(self, rule: ConnectTimeout, waits: float) -> None:
        """The driver of this attempt was told (by ``rule``) to wait at most ``waits`` seconds."""
        self.rule = rule
        self.waits = waits

    def publish(self) -> Token[AttemptTimer | None]:
        """Make this timer the one the ``do_connect`` listener sees (undo with :func:`retire`)."""
        return publish(self)

    def worth_another(self, now: float, remaining_then: float) -> bool:
        """Whether to make another attempt, ``remaining_then`` seconds before the deadline.

        False only when the attempt that just failed ran into its time limit (the server is
        most likely still black-holed) and the driver cannot end the next one by the deadline
        (libpq's whole seconds, at least 2).
        """
        rule, waits = self.rule, self.waits
        if rule is None or waits is None:
            return True
        ran_out = now - self.started >= _RAN_OUT * waits
        if not ran_out:
            return True
        return rule.bound(min(waits, self.limit_for(remaining_then))) <= remaining_then


#: ``publish(timer)`` makes ``timer`` the one the ``do_connect`` listener sees and returns the
#: token that ``retire(token)`` takes to undo it. They are the context variable's own methods:
#: every connect calls both, and a function around them would add two Python calls to it.
publish: Callable[[AttemptTimer | None], Token[AttemptTimer | None]] = _current.set
retire: Callable[[Token[AttemptTimer | None]], None] = _current.reset

"""Is a pooled connection still alive? First without a round trip, then, after idleness, a ping.

A server that ends a session (``pg_terminate_backend``, a fast or smart shutdown, an idle
timeout) sends an error and closes the socket. An idle connection's socket has nothing to read,
so a readable one was closed by the server or sent it an error: a ``poll()`` with no timeout
tells, in well under a microsecond and without sending anything. asyncpg also keeps its own
flag (``is_closed()``), set once the event loop has seen the close. A connection that died
without a word (a host gone, a firewall that drops the flow) looks alive to both; the ping
after ``ping_after`` seconds of idleness is for those.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import ArgumentError
from sqlalchemy.util import asbool

from .policy import _NONE_WORDS, _number

DEFAULT_LIVENESS_CHECK = True
#: A connection used within the last second is trusted; pgx's ShouldPing uses the same second.
#: At most ``pool_size`` pings per second, and only while the pool is underused.
DEFAULT_PING_AFTER: float | None = 1.0


@dataclass(frozen=True)
class LivenessPolicy:
    """``check``: look at each pooled connection before lending it; ``ping_after``: idle seconds
    after which a real round trip is made too (None: never)."""

    check: bool = DEFAULT_LIVENESS_CHECK
    ping_after: float | None = DEFAULT_PING_AFTER

    @classmethod
    def from_arguments(
        cls,
        liveness_check: Any = DEFAULT_LIVENESS_CHECK,
        liveness_ping_after: Any = DEFAULT_PING_AFTER,
    ) -> LivenessPolicy:
        try:
            check = asbool(liveness_check)
        except ValueError:
            raise ArgumentError(
                f"liveness_check must be true or false, got {liveness_check!r}"
            ) from None
        if not isinstance(check, bool):
            raise ArgumentError(f"liveness_check must be true or false, got {liveness_check!r}")
        ping_after: float | None = None
        if not (
            liveness_ping_after is None
            or (
                isinstance(liveness_ping_after, str)
                and liveness_ping_after.strip().lower() in _NONE_WORDS
            )
        ):
            ping_after = _number(
                "liveness_ping_after", liveness_ping_after, minimum=0.0, strict=False
            )
        return cls(check, ping_after)


Poll = Callable[[int], list[Any]]


class Probe:
    """A check of one physical connection that sends nothing; built once per connection.

    Two callables, called by the checkout itself (no method of the probe in between: every
    checkout runs them): ``closed()``, the driver's own flag, and ``readable(0)``, a ``poll()``
    of the idle socket (an empty list when nothing waits). The connection is dead when either
    says so. ``closed`` is asked first: once the driver has closed the socket its descriptor may
    belong to another connection.
    """

    __slots__ = ("closed", "readable")

    def __init__(self, closed: Callable[[], bool], readable: Poll) -> None:
        self.closed = closed
        self.readable = readable


def _readable(fd: int) -> Poll:
    """A callable telling, without waiting, whether ``fd`` has data, an EOF or an error."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)  # POLLERR/POLLHUP always reported
        return poller.poll

    def by_select(timeout: int) -> list[Any]:  # platforms without poll(), e.g. Windows
        readable, _, errored = select.select([fd], [], [fd], timeout)
        return readable + errored

    return by_select


def _never(timeout: int) -> list[Any]:
    return []


def psycopg_probe(connection: Any) -> Probe:
    """psycopg 3, sync or async: closed by psycopg already, or a readable idle socket.

    libpq reads only when asked, so whatever the server sent waits in the socket. A connection
    that LISTENs and has a notification pending is replaced too (pools rarely LISTEN).
    ``closed`` is psycopg's own property, called as a bound function.
    """
    closed = type(connection).closed.fget.__get__(connection)
    return Probe(closed, _readable(connection.fileno()))


def asyncpg_probe(connection: Any) -> Probe:
    """asyncpg: its own closed flag (``is_closed()``, set once the event loop has seen the
    close), then the socket, for a close the event loop has not read yet."""
    transport = getattr(connection, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return Probe(connection.is_closed, _readable(sock.fileno()) if sock is not None else _never)


def probe_for(driver_connection: Any) -> Probe | None:
    """The probe for a driver's connection, or None for a driver this module does not know."""
    module = type(driver_connection).__module__
    try:
        if module.startswith("asyncpg"):
            return asyncpg_probe(driver_connection)
        if module.startswith("psycopg") and hasattr(driver_connection, "fileno"):
            return psycopg_probe(driver_connection)
    except (OSError, ValueError, AttributeError):  # closed already, or an unexpected shape
        return None
    return None

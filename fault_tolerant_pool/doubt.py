"""When to ping a new connection: only while the pool has reason to doubt that one works.

Behind PgBouncer a login succeeds while the server behind it is down (PgBouncer answers for
it), and the failure comes with the first statement, after the connection was handed out: too
late to retry. A ping inside the retry loop catches that, but costs a round trip on every
connect, and behind ``NullPool`` every checkout is a connect. So by default (``retry_ping="auto"``)
a new connection is pinged only within :data:`DOUBT_WINDOW` seconds of a sign of trouble: a
failed connect attempt, a failed ping, or a statement that failed with a disconnect or a
connection-class error. On the happy path the check is one attribute read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.exc import ArgumentError

#: Seconds after the last sign of trouble during which new connections are pinged.
DOUBT_WINDOW = 10.0

#: ``retry_ping`` values.
AUTO = "auto"


class Doubt:
    """Whether the pool doubts new connections now; clock injectable for tests.

    ``until`` is 0.0 while there is no doubt, so the happy path reads no clock.
    """

    __slots__ = ("clock", "until", "window")

    def __init__(
        self, window: float = DOUBT_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.clock = clock
        self.until = 0.0

    def raised(self) -> None:
        """A sign of trouble was seen now."""
        self.until = self.clock() + self.window

    def active(self) -> bool:
        """Whether a new connection should be pinged now."""
        until = self.until
        if not until:
            return False
        if self.clock() < until:
            return True
        self.until = 0.0
        return False


def ping_mode(value: object) -> bool | None:
    """Coerce ``retry_ping``: True (always), False (never), None for "auto" (while in doubt)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word == AUTO:
            return None
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    elif isinstance(value, bool | int) and value in (0, 1):
        return bool(value)
    raise ArgumentError(f'retry_ping must be true, false or "auto", got {value!r}')

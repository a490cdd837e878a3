"""How long a pooled connection may live and sit unused: settings, deadlines, the idle window."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import ArgumentError

from .policy import _NONE_WORDS, _number

#: Off unless asked for: the pool then keeps connections as long as SQLAlchemy's own would.
DEFAULT_MAX_LIFETIME: float | None = None
DEFAULT_MAX_IDLE: float | None = None
#: Share of ``max_lifetime`` a connection's lifetime may be shortened by (HikariCP uses 25%).
DEFAULT_LIFETIME_JITTER = 0.25


def optional_seconds(name: str, value: Any) -> float | None:
    """A positive number of seconds, or None (also from the strings "none"/"null"/"")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        return None
    return _number(name, value, minimum=0.0, strict=True)


@dataclass(frozen=True)
class LifetimePolicy:
    """``max_lifetime`` shortened per connection by up to ``jitter`` of it, and ``max_idle``."""

    max_lifetime: float | None = DEFAULT_MAX_LIFETIME
    jitter: float = DEFAULT_LIFETIME_JITTER
    max_idle: float | None = DEFAULT_MAX_IDLE

    @classmethod
    def from_arguments(
        cls,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
        lifetime_jitter: Any = DEFAULT_LIFETIME_JITTER,
        max_idle: Any = DEFAULT_MAX_IDLE,
    ) -> LifetimePolicy:
        jitter = _number("lifetime_jitter", lifetime_jitter, minimum=0.0, strict=False)
        if jitter >= 1.0:
            raise ArgumentError(
                f"lifetime_jitter must be a fraction below 1 (0.25 = up to 25% shorter), "
                f"got {lifetime_jitter!r}"
            )
        return cls(
            optional_seconds("max_lifetime", max_lifetime),
            jitter,
            optional_seconds("max_idle", max_idle),
        )

    def deadline(self, created: float, random: Callable[[], float]) -> float:
        """When a connection created at ``created`` must retire; drawn once, at creation.

        Uniform in ``(created + max_lifetime * (1 - jitter), created + max_lifetime]``: the
        jitter only ever shortens the lifetime, so ``max_lifetime`` is a true upper bound.
        """
        if self.max_lifetime is None:
            return math.inf
        return created + self.max_lifetime * (1.0 - self.jitter * random())


class IdleWindow:
    """Tells, at checkin, whether the pool holds connections it has not needed for ``max_idle``.

    It tracks the fewest connections sitting idle in the pool at any moment of the current
    window (the pool reports the count after each checkout and before each checkin). When a
    window of ``max_idle`` seconds ends, that many connections sat unused through all of it:
    so many returned connections are then closed instead of kept, one per checkin, and only
    while another connection is idle (a pool in full use never shrinks). This works for FIFO
    and LIFO pools alike; a pool that sees no traffic at all is not touched (nothing runs in the
    background). Under threads the counts are approximate: at worst one connection more or
    fewer is retired, and a retired connection is opened again on demand.
    """

    __slots__ = ("budget", "low", "max_idle", "started")

    def __init__(self, max_idle: float, now: float) -> None:
        self.max_idle = max_idle
        self.started = now
        self.low = 0
        self.budget = 0

    def observe(self, idle: int) -> None:
        """The pool holds ``idle`` idle connections right after a checkout."""
        if idle < self.low:
            self.low = idle

    def retire_on_checkin(self, now: float, idle: int) -> bool:
        """A connection comes back while ``idle`` others sit in the pool: close it instead?"""
        if idle < self.low:
            self.low = idle
        if now - self.started >= self.max_idle:
            self.budget = self.low
            self.started = now
            self.low = idle + 1
        if self.budget > 0 and idle > 0:
            self.budget -= 1
            if idle < self.low:
                self.low = idle
            return True
        return False

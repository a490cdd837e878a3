"""Retry policy: an immutable, validated configuration and the per-connect backoff state."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.exc import ArgumentError

#: Defaults chosen for a web service (see docs/parameters.md for the reasoning).
DEFAULT_ATTEMPTS: int | None = None
DEFAULT_DEADLINE = 10.0
DEFAULT_INITIAL_DELAY = 0.05
DEFAULT_MAX_DELAY = 0.5
DEFAULT_ATTEMPT_TIMEOUT = 5.0
BACKOFF_MULTIPLIER = 2.0

_NONE_WORDS = frozenset({"", "none", "null"})


def _number(name: str, value: Any, *, minimum: float, strict: bool) -> float:
    """Coerce ``value`` (a number or an ``engine_from_config`` string) to a bounded float."""
    if isinstance(value, bool):
        raise ArgumentError(f"{name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number of seconds, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise ArgumentError(f"{name} must be a finite number of seconds, got {value!r}")
    if number < minimum or (strict and number == minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ArgumentError(f"{name} must be {bound}, got {value!r}")
    return number


def _attempts(value: Any, name: str = "retry_attempts") -> int | None:
    """Coerce an attempt count: a positive integer, or None for "bounded by the deadline only"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        return None
    wrong = ArgumentError(f"{name} must be a positive integer or None, got {value!r}")
    if isinstance(value, bool):
        raise wrong
    try:
        number = int(value) if isinstance(value, str) else value
    except ValueError:
        raise wrong from None
    if not isinstance(number, int) or number < 1:
        raise wrong
    return number


def _delays(initial: Any, maximum: Any, *, prefix: str) -> tuple[float, float]:
    """Coerce a backoff's first and largest sleep (``{prefix}initial_delay``, ``..max_delay``)."""
    low = _number(f"{prefix}initial_delay", initial, minimum=0.0, strict=False)
    high = _number(f"{prefix}max_delay", maximum, minimum=0.0, strict=False)
    if high < low:
        raise ArgumentError(
            f"{prefix}max_delay ({maximum!r}) must be at least {prefix}initial_delay ({initial!r})"
        )
    return low, high


def _optional_seconds(name: str, value: Any) -> float | None:
    """Coerce a positive number of seconds, or None (also from the strings "none" and "")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        return None
    return _number(name, value, minimum=0.0, strict=True)


@dataclass(frozen=True)
class RetryPolicy:
    """How one physical connect is retried: attempts, deadline and exponential full-jitter backoff.

    ``attempts`` counts the first try; ``None`` leaves the deadline as the only bound.
    ``attempt_timeout`` caps one attempt (see :mod:`fault_tolerant_pool.timeouts`); ``None``
    leaves the time left before the deadline as its only bound.
    """

    attempts: int | None = DEFAULT_ATTEMPTS
    deadline: float = DEFAULT_DEADLINE
    initial_delay: float = DEFAULT_INITIAL_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    multiplier: float = BACKOFF_MULTIPLIER
    attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT

    @classmethod
    def from_arguments(
        cls,
        retry_attempts: Any = DEFAULT_ATTEMPTS,
        retry_deadline: Any = DEFAULT_DEADLINE,
        retry_initial_delay: Any = DEFAULT_INITIAL_DELAY,
        retry_max_delay: Any = DEFAULT_MAX_DELAY,
        retry_attempt_timeout: Any = DEFAULT_ATTEMPT_TIMEOUT,
    ) -> RetryPolicy:
        """Validate the pool's keyword arguments (numbers or config strings) into a policy."""
        initial, maximum = _delays(retry_initial_delay, retry_max_delay, prefix="retry_")
        return cls(
            attempts=_attempts(retry_attempts),
            deadline=_number("retry_deadline", retry_deadline, minimum=0.0, strict=True),
            initial_delay=initial,
            max_delay=maximum,
            attempt_timeout=_optional_seconds("retry_attempt_timeout", retry_attempt_timeout),
        )

    def new(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed (the policy itself is never mutated)."""
        return replace(self, **changes)

    def backoff_cap(self, failures: int) -> float:
        """The upper bound of the sleep after the ``failures``-th failed attempt (1-based)."""
        exponent = min(failures - 1, 64)
        return min(self.max_delay, self.initial_delay * self.multiplier**exponent)


class Backoff:
    """The state of one connect's retry sequence; pure, given a clock reading and a random draw."""

    __slots__ = ("failures", "policy", "started")

    def __init__(self, policy: RetryPolicy, started: float) -> None:
        self.policy = policy
        self.started = started
        self.failures = 0

    def stop(self) -> None:
        """Record a failed attempt that must not be retried (a permanent error)."""
        self.failures += 1

    def elapsed(self, now: float) -> float:
        return now - self.started

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.policy.deadline - (now - self.started)

    def next_delay(self, now: float, random: Callable[[], float]) -> float | None:
        """Record a failed attempt; return the sleep before the next one, or None to give up.

        Full jitter: a uniform draw in ``[0, cap)``; the sleep is clamped so it never carries
        past the deadline, and no attempt starts once the deadline has passed.
        """
        self.failures += 1
        policy = self.policy
        if policy.attempts is not None and self.failures >= policy.attempts:
            return None
        remaining = policy.deadline - (now - self.started)
        if remaining <= 0:
            return None
        return min(random() * policy.backoff_cap(self.failures), remaining)

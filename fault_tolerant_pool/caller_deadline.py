"""A caller's own deadline for the connects made for it, shorter than the pool's ``retry_deadline``.

The retry loop gives every physical connect up to ``retry_deadline`` (10 s by default): right for
a request that has nowhere else to go. A caller that has somewhere else to go (the read router,
with other readers and the writer; its checker, which must report a dead reader promptly) sets a
shorter deadline around its checkout with :func:`connects_within`. Every connect the pool makes
for it meanwhile, in this thread or this asyncio task, then gives up by that deadline: its
retries, its attempts' time limits and its wait at the gate for another caller's probe.

Everyone else's connects are unchanged. The deadline lives in a context variable that the retry
loop reads once per physical connect, never per checkout; the pool's gate keeps its own
``retry_deadline`` for fail-fast, so one impatient caller does not make a whole pool fail fast.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from .policy import RetryPolicy

_seconds: ContextVar[float | None] = ContextVar("fault_tolerant_pool_caller_deadline", default=None)


class connects_within:  # a function in use: ``with connects_within(1.5):``
    """Within the block, each connect made for this thread or task gives up after ``seconds``
    at most (or the pool's ``retry_deadline``, if that is shorter). A class, not a generator:
    the read router enters it on every reader checkout."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._token: Token[float | None] | None = None

    def __enter__(self) -> None:
        self._token = _seconds.set(self._seconds)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _seconds.reset(self._token)


def policy_for(policy: RetryPolicy) -> RetryPolicy:
    """``policy`` with the caller's deadline when one is set and it is shorter (a new value:
    the pool's policy is never changed)."""
    seconds = _seconds.get()
    if seconds is None or seconds >= policy.deadline:
        return policy
    return policy.new(deadline=seconds)

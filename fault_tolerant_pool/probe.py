"""The probe: while connects fail, one attempt at a time per pool; fail fast once it lasts.

A pool whose server stops answering would otherwise have every caller that needs a connection
dial and retry on its own (a herd against a server that is coming back, a fleet multiplying it).
The :class:`Gate` keeps one state per pool:

- ``healthy``: callers connect at once, at most :attr:`ProbeSchedule.healthy_concurrency` at a
  time (as HikariCP and psycopg_pool grow one connection at a time; a cold start or a mass
  invalidation makes a few logins at once, not a herd, and an outage meets few attempts).
- ``failing``: an attempt has failed. One attempt at a time (the probe), paced by
  :class:`ProbeSchedule`; every other caller that needs a connection waits for the probe's
  outcome, within its own deadline.
- ``failing_fast``: the pool has been unable to connect for a whole retry deadline. Callers that
  need a new connection fail at once; a caller arriving when the next probe is due makes that one
  attempt (so the probe keeps trying, paced, while there is traffic).
- ``recovering``: a probe succeeded. Waiting callers connect, at most
  :attr:`ProbeSchedule.recovery_concurrency` at a time (no herd on the server that just came
  back), until nobody waits; then ``healthy``.

An attempt in flight for longer than a login normally takes here (:mod:`.hedge`) is presumed
held by a proxy that accepted it and has no server to give it: it no longer counts against those
limits, and a waiting caller tries alongside it (at most :attr:`ProbeSchedule.hedge_limit` more,
paced like probes while failing fast). A failure that has seen an attempt held and a close
before any server spoke is a proxy changing its routes (HAProxy during a failover): until
fail-fast the probe asks it every :attr:`ProbeSchedule.proxied`. A failure of an attempt that
began before the server was last reached is stale news and changes no state.

A caller that gives up (its deadline, a cancellation) hands on whatever it was woken for, so no
waiter is stranded. Waiting is a :class:`Waiter`: a ``threading.Event`` for sync engines, an
``asyncio`` future awaited through SQLAlchemy's greenlet bridge for async ones (the event loop
keeps serving). The state machine itself takes the clock and the random source as arguments,
so it is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sqlalchemy.util import await_only

from .errors import DatabaseUnreachable, unreachable_error, unreachable_message
from .hedge import LoginTimes

logger = logging.getLogger("fault_tolerant_pool.probe")

State = Literal["healthy", "failing", "failing_fast", "recovering"]
STATES: tuple[State, ...] = ("healthy", "failing", "failing_fast", "recovering")


class Admission(enum.Enum):
    """What :meth:`Gate.enter` lets a caller do."""

    GO = "go"
    """Make one connect attempt now, then report it with :meth:`Gate.finished` or
    :meth:`Gate.abandoned`."""
    FAIL_FAST = "fail_fast"
    """The server has been unreachable for a whole deadline: fail at once."""
    EXPIRED = "expired"
    """The caller's deadline passed while it waited for the probe."""
    REJECTED = "rejected"
    """``max_waiting`` callers were already waiting."""


@dataclass(frozen=True)
class ProbeSchedule:
    """How often the probe tries while the server is failing, and how recovery ramps up.

    The pause between two probes is ``first`` at the start of a failure, grows with the cube of
    the failure's age over ``knee`` (0.19 s at 2 s, 0.30 s at 3 s, 0.52 s at 4 s) and stays at
    ``last`` from about 4.2 s on; each pause is shortened or lengthened by up to ``jitter`` of
    itself at random, so the pools of a fleet that failed together drift apart. A restart
    (1-5 s) is noticed within about 0.2 s, a long outage within ``last`` (+ jitter).
    """

    first: float = 0.14
    last: float = 0.6
    knee: float = 5.5
    jitter: float = 0.15
    healthy_concurrency: int | None = 4
    """None: no limit (``FaultTolerantNullPool``, where every checkout is a connect)."""
    recovery_concurrency: int = 2
    hedge_limit: int = 24
    """Attempts presumed held that may be in flight beyond the limits above."""
    proxied: float = 0.05
    """The pause (at most) after a failure where something accepted the connection and
    closed it before any database server spoke (see :func:`.classify.closed_by_proxy`): a
    proxy with no server to give it (HAProxy between a leader's fall and its successor's rise,
    a cloud load balancer), once the same failure has also seen an attempt held (longer than
    :attr:`.LoginTimes.held_after`: routed to a server that is gone, which the proxy retries).
    Such a proxy is changing its routes: it may have a server for the next connection at any
    moment (HAProxy checks every second or so), and asking costs the database nothing. So until
    fail-fast opens the probe asks at this pace, as a stock pool's callers would at once, and
    beside attempts still held another goes no less often. Closes alone (one server behind a
    proxy, down: reset at once), a refused connection (nothing listening) and a server's own
    refusal (57P03, 53300) get the growing pause above, which keeps a fleet's attempts on a
    down server to a few a second."""

    def pause(self, age: float, draw: float) -> float:
        """Seconds from a failed probe to the next, ``age`` seconds into the failure;
        ``draw`` is a uniform random number in ``[0, 1)``."""
        base = min(self.last, self.first + (max(age, 0.0) / self.knee) ** 3)
        return self._jittered(base, draw)

    def proxied_pause(self, age: float, draw: float) -> float:
        """:meth:`pause` after a close by a proxy changing its routes: :attr:`proxied` at most
        (jittered alike)."""
        return min(self.pause(age, draw), self._jittered(self.proxied, draw))

    def _jittered(self, base: float, draw: float) -> float:
        return base * (1.0 + self.jitter * (2.0 * draw - 1.0))


class Waiter(Protocol):
    """One caller waiting for the gate; woken at most once."""

    woken: bool

    def wait(self, timeout: float) -> None:
        """Return when woken or after ``timeout`` seconds (cancellation propagates)."""

    def wake(self) -> None:
        """Wake the caller (from any thread); idempotent."""


class ThreadWaiter:
    """A waiter for sync engines: the calling thread blocks on an event."""

    __slots__ = ("_event", "woken")

    def __init__(self) -> None:
        self.woken = False
        self._event = threading.Event()

    def wait(self, timeout: float) -> None:
        self._event.wait(max(timeout, 0.0))

    def wake(self) -> None:
        self.woken = True
        self._event.set()


class AsyncWaiter:
    """A waiter for async engines: pool code runs in a greenlet on the event loop, so it awaits
    an ``asyncio`` future through SQLAlchemy's bridge (the loop keeps serving, and a cancelled
    task is cancelled here too)."""

    __slots__ = ("_future", "_loop", "woken")

    def __init__(self) -> None:
        self.woken = False
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] = self._loop.create_future()

    def wait(self, timeout: float) -> None:
        await_only(asyncio.wait((self._future,), timeout=max(timeout, 0.0)))

    def wake(self) -> None:
        self.woken = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._resolve()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)


def default_waiter(in_loop: bool) -> Waiter:
    """An :class:`AsyncWaiter` inside SQLAlchemy's greenlet bridge, else a :class:`ThreadWaiter`."""
    return AsyncWaiter() if in_loop else ThreadWaiter()


class WaitingRoom:
    """Counts the callers waiting for a slot or for the probe; ``limit`` (``max_waiting``) caps
    them, None leaves them uncounted beyond the gauge."""

    __slots__ = ("_lock", "limit", "rejected", "waiting")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.waiting = 0
        self.rejected = 0
        self._lock = threading.Lock()

    def join(self) -> bool:
        """Take a seat; False (and counted as rejected) when ``limit`` callers already wait."""
        with self._lock:
            if self.limit is not None and self.waiting >= self.limit:
                self.rejected += 1
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.waiting -= 1


class GateListener(Protocol):
    """Told of the gate's events that have a metric (the telemetry)."""

    def failed_fast(self) -> None: ...

    def outage_ended(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class GateFigures:
    """The gate's part of ``PoolStats``."""

    state: State
    unreachable_since: float | None
    outage_attempts: int
    outages: int
    hedged: int
    """Attempts admitted alongside one presumed held (see :mod:`.hedge`)."""
    last_outage: float | None
    fast_failures: int
    waiting: int
    rejected: int


class Gate:
    """The connect state of one pool (see the module's docstring); shared by ``recreate()``.

    ``deadline`` is the retry deadline: failing for that long opens fail-fast (unless
    ``fail_fast`` is False). ``clock`` is monotonic, ``wall`` is ``time.time`` (for messages).
    """

    def __init__(
        self,
        deadline: float,
        *,
        fail_fast: bool = True,
        schedule: ProbeSchedule | None = None,
        room: WaitingRoom | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        waiter: Callable[[bool], Waiter] = default_waiter,
        logins: LoginTimes | None = None,
    ) -> None:
        self.deadline = deadline
        self.fail_fast = fail_fast
        self.schedule = schedule if schedule is not None else ProbeSchedule()
        self.room = room if room is not None else WaitingRoom()
        self.clock = clock
        self.wall = wall
        self.random = random
        self.waiter = waiter
        self.logins = logins if logins is not None else LoginTimes()
        self.listener: GateListener | None = None
        self._lock = threading.Lock()
        self._state: State = "healthy"
        self._in_flight = 0
        self._waiters: deque[Waiter] = deque()
        self._failing_since = 0.0  # monotonic
        self._failing_wall = 0.0
        self._next_probe_at = 0.0
        self._last_go = float("-inf")  # when the newest attempt was admitted
        self._reached_at = float("-inf")  # when an attempt last reached the server
        self._proxied = False  # the last failure: a close by a proxy changing its routes
        self._held_in_failure = False  # an attempt was presumed held since the failure began
        self.outage_attempts = 0
        self.hedged = 0
        self.last_error: Exception | None = None
        self.outages = 0
        self.last_outage: float | None = None
        self.fast_failures = 0
        self._message: tuple[tuple[Exception, int], str] | None = None

    @property
    def state(self) -> State:
        return self._state

    # -- the caller's side -------------------------------------------------------------------------

    def enter(self, deadline_at: float, in_loop: bool) -> Admission:
        """Wait until this caller may make a connect attempt, or say why it may not.

        ``deadline_at`` is the caller's own deadline on :attr:`clock`. After ``GO`` the caller
        must report the attempt with :meth:`finished` or :meth:`abandoned`.
        """
        waiter: Waiter | None = None
        seated = False
        admission: Admission | None = None
        try:
            while True:
                with self._lock:
                    if waiter is not None:
                        self._remove(waiter)
                    now = self.clock()
                    admission, wake_at = self._decide(now, deadline_at)
                    if admission is None:
                        if not seated:
                            if not self.room.join():
                                admission = Admission.REJECTED
                                return admission
                            seated = True
                        waiter = self.waiter(in_loop)
                        self._waiters.append(waiter)
                    elif admission is Admission.GO:
                        self._in_flight += 1
                        self._last_go = now
                        return admission
                    else:
                        return admission
                waiter.wait(wake_at - now)
        finally:
            if seated:
                self.room.leave()
            if waiter is not None and admission is not Admission.GO:
                with self._lock:
                    self._remove(waiter)
                    if waiter.woken:
                        self._wake_free()  # hand on what this caller was woken for

    def enter_now(self) -> bool:
        """:meth:`enter` for a caller that is let through without waiting: True (``GO``, to be
        reported like any other) while the pool is healthy and below its limit; False changes
        nothing (then :meth:`enter` decides). The connect path's first call: one lock, no
        waiter, no deadline."""
        with self._lock:
            if self._state == "healthy":
                cap = self.schedule.healthy_concurrency
                if cap is None or self._in_flight < cap:
                    self._in_flight += 1
                    self._last_go = self.clock()
                    return True
        return False

    def finished(
        self,
        now: float,
        error: Exception | None,
        started: float,
        attempt_started: float | None = None,
        proxied: bool = False,
    ) -> None:
        """Report an attempt admitted with ``GO``: ``error`` is None when the server was reached
        (connected, or answered with a permanent error), else the transient error.
        ``started`` is when the caller's connect began (its first attempt), ``attempt_started``
        when this attempt did (its duration feeds :attr:`logins`; None: unknown). ``proxied``:
        the transient error came from a proxy with no server for it
        (:attr:`ProbeSchedule.proxied`)."""
        with self._lock:
            self._in_flight -= 1
            if error is None:
                if attempt_started is not None:
                    self.logins.observe(now - attempt_started)
                self._reached(now)
            elif attempt_started is not None and attempt_started < self._reached_at:
                self._wake_free()  # stale: the server was reached after this attempt began
            else:
                held = attempt_started is not None and now - attempt_started >= (
                    self.logins.held_after
                )
                self._failed(now, error, started, proxied, held)

    def abandoned(self) -> None:
        """An attempt admitted with ``GO`` was cancelled: hand the probe on."""
        with self._lock:
            self._in_flight -= 1
            self._wake_all()

    def next_probe_in(self, now: float) -> float:
        return max(self._next_probe_at - now, 0.0)

    def unreachable_since(self) -> float | None:
        """``time.time()`` of the start of the failure, or None while connects succeed."""
        return None if self._state in ("healthy", "recovering") else self._failing_wall

    def figures(self) -> GateFigures:
        return GateFigures(
            state=self._state,
            unreachable_since=self.unreachable_since(),
            outage_attempts=self.outage_attempts,
            outages=self.outages,
            hedged=self.hedged,
            last_outage=self.last_outage,
            fast_failures=self.fast_failures,
            waiting=self.room.waiting,
            rejected=self.room.rejected,
        )

    def unreachable(
        self,
        dbapi: Any,
        last_error: Exception,
        error_type: str,
        *,
        attempts: int,
        elapsed: float,
        secrets: tuple[str, ...],
    ) -> DatabaseUnreachable:
        """The error of a caller refused while failing fast (its message is built once per
        failed probe: refusing costs little while callers keep coming)."""
        key = (last_error, self.outage_attempts)
        cached = self._message
        if cached is None or cached[0] != key:
            message = unreachable_message(
                since=self._failing_wall,
                outage_attempts=self.outage_attempts,
                last_error=last_error,
                error_type=error_type,
                secrets=secrets,
            )
            self._message = cached = (key, message)
        return unreachable_error(
            dbapi,
            cached[1],
            since=self._failing_wall,
            outage_attempts=self.outage_attempts,
            attempts=attempts,
            elapsed=elapsed,
            last_error=last_error,
        )

    def count_fast_failure(self) -> None:
        with self._lock:
            self.fast_failures += 1
        if self.listener is not None:
            self.listener.failed_fast()

    # -- the state machine (called with the lock held) --------------------------------------------

    def _limit(self) -> float:
        """Attempts that may be in flight in this state before the next must wait."""
        state = self._state
        if state == "healthy":
            cap = self.schedule.healthy_concurrency
            return float("inf") if cap is None else cap
        return self.schedule.recovery_concurrency if state == "recovering" else 1

    def _held_until(self) -> float:
        """When the attempts in flight, all at the state's limit, count as held: another may
        go then (inf: :attr:`ProbeSchedule.hedge_limit` more are already in flight). A held
        attempt costs the server nothing (the proxy holds it), so only a long outage (failing
        fast) paces them like probes."""
        if self._in_flight >= self._limit() + self.schedule.hedge_limit:
            return float("inf")
        delay = self.logins.held_after
        if self._proxied:  # a proxy is closing the rest at once: no slower than its pace
            delay = min(delay, self.schedule.proxied)
        if self._state == "failing_fast":  # a long outage: paced like the probes
            delay = max(delay, self.schedule.pause(self._last_go - self._failing_since, 0.5))
        return self._last_go + delay

    def _hedge(self, now: float) -> tuple[Admission, float]:
        """Admit an attempt beside those presumed held."""
        self._held_in_failure = True
        self.hedged += 1
        logger.debug(
            "%d connect attempt(s) in flight for over %.3fs: another caller tries alongside",
            self._in_flight,
            now - self._last_go,
        )
        return Admission.GO, now

    def _decide(self, now: float, deadline_at: float) -> tuple[Admission | None, float]:
        """(admission, or None to wait; until when to wait at most)."""
        state = self._state
        if state == "healthy":
            cap = self.schedule.healthy_concurrency
            if cap is None or self._in_flight < cap:
                return Admission.GO, now
            held = self._held_until()
            if now >= held:
                return self._hedge(now)
            return (Admission.EXPIRED, now) if now >= deadline_at else (None, held)
        if state == "failing" and self.fail_fast and now - self._failing_since >= self.deadline:
            state = self._open(now)
        if now >= deadline_at:
            return Admission.EXPIRED, now  # (a caller that waited its whole deadline)
        if state == "recovering":
            if self._in_flight < self.schedule.recovery_concurrency:
                return Admission.GO, now
            held = self._held_until()
            return self._hedge(now) if now >= held else (None, min(deadline_at, held))
        # failing: one probe at a time (more only beside one presumed held), not before it is
        # due; wait for its outcome, its next turn or fail-fast, whichever comes first
        due = self._next_probe_at
        if self._in_flight:
            due = max(due, self._held_until())
        if now >= due:
            return self._hedge(now) if self._in_flight else (Admission.GO, now)
        if state == "failing_fast":
            return Admission.FAIL_FAST, now
        until = min(deadline_at, due)
        if self.fail_fast:
            until = min(until, self._failing_since + self.deadline)
        return None, until

    def _open(self, now: float) -> State:
        self._state = "failing_fast"
        error = self.last_error
        logger.warning(
            "connects have failed for %.1fs (%d attempts): failing fast; new connections fail at "
            "once while one probe retries (every %.2fs at most); last error %s",
            now - self._failing_since,
            self.outage_attempts,
            self.schedule.last,
            "none" if error is None else type(error).__name__,
        )
        self._wake_all()  # those waiting for the probe fail fast too
        return "failing_fast"

    def _failed(
        self,
        now: float,
        error: Exception,
        started: float,
        proxied: bool = False,
        held: bool = False,
    ) -> None:
        if self._state in ("healthy", "recovering"):
            self._state = "failing"
            self._failing_since = min(now, started)
            self.outage_attempts = 0
        elif started < self._failing_since:  # a connect that began earlier failed too
            self._failing_since = started
        self._failing_wall = self.wall() - (now - self._failing_since)
        self.outage_attempts += 1
        self.last_error = error
        pause = self.schedule.pause
        # A proxy that holds some attempts (routing them to a server that is gone) and closes
        # others is changing its routes; closes alone (one server behind a proxy, down) keep
        # the schedule's pause.
        self._held_in_failure = self._held_in_failure or held
        self._proxied = proxied and self._held_in_failure and self._state == "failing"
        if self._proxied:
            pause = self.schedule.proxied_pause  # the proxy may route the next one elsewhere
        self._next_probe_at = now + pause(now - self._failing_since, self.random())
        self._wake_all()  # each recomputes until when it waits (the next probe's time)

    def _reached(self, now: float) -> None:
        self._reached_at = now
        self._proxied = self._held_in_failure = False
        state = self._state
        if state == "healthy" and not self._waiters:
            return  # a connect that succeeds while all is well: no outage to end, none to wake
        if state in ("failing", "failing_fast"):
            length = now - self._failing_since
            self.outages += 1
            self.last_outage = length
            logger.info(
                "connects succeed again after %.1fs of failure (%d failed attempts)%s",
                length,
                self.outage_attempts,
                " - no longer failing fast" if state == "failing_fast" else "",
            )
            if self.listener is not None:
                self.listener.outage_ended(length)
            self._state = state = "recovering"
        if state == "recovering" and not self._waiters:
            self._state = "healthy"
            self.last_error = None
        self._wake_free()

    def _wake_free(self) -> None:
        """Wake as many waiters as could be admitted now (all of them when that is unclear)."""
        state = self._state
        if state == "healthy" or state == "recovering":
            limit = self.schedule.healthy_concurrency
            if state == "recovering":
                limit = self.schedule.recovery_concurrency
            free = len(self._waiters) if limit is None else limit - self._in_flight
            for _ in range(min(free, len(self._waiters))):
                self._waiters.popleft().wake()
        else:
            self._wake_all()

    def _wake_all(self) -> None:
        while self._waiters:
            self._waiters.popleft().wake()

    def _remove(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):  # already woken, so no longer queued
            self._waiters.remove(waiter)

"""The transaction runner: a unit of work the application declares re-runnable, run again safely.

The pool never replays a statement on its own: it retries only before a connection is handed
out. What still reaches the application after that are the statements in flight when the server
went away (a restart, a crash, a terminated session, a demoted writer). The application can say
"this function is one unit of work in one transaction; it may run again"; the runner then begins
a transaction, calls the function, commits, and re-runs the *whole* function on a fresh
connection when the failure is one that leaves nothing behind:

- a connection-class failure (a disconnect, SQLSTATE class ``08``, ``57P01``/``57P02``/``57P03``,
  a demoted writer's ``25006``, a ping cut by ``ping_timeout``) raised *before* COMMIT was sent:
  the server rolls back a transaction whose session ends;
- a serialization failure or a deadlock (``40001``, ``40P01``), in any phase: the server
  answered, and it rolled the transaction back.

A connection-class failure while COMMIT was in flight leaves the client unable to tell whether
the server committed. The runner notes the transaction's id just before COMMIT and, after such a
cut, asks the server (:mod:`~fault_tolerant_pool.commit_outcome`): committed, the run succeeded
and its result is returned; provably not committed, it runs again. When the server cannot say
(it restarted or failed over and reports the id committed, or cannot be reached), the outcome is
unknown: never re-run (unless the function is declared ``idempotent``), it raises
:class:`TransactionOutcomeUnknown`. Anything else (the application's own exceptions, constraint
violations, syntax errors, a connect the pool itself gave up on) is raised at once, unchanged,
after a single call.

The decision is :func:`decide`, a pure function of the error and the phase; the backoff is the
pool's (:class:`~fault_tolerant_pool.policy.Backoff`, full jitter); both are unit-tested without
a database and without sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from opentelemetry import trace
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from ._asyncio_ext import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from .classify import Classifier, _chain, classify, innermost_class, sqlstate_of
from .commit_outcome import (
    CommitNote,
    Settlement,
    note,
    note_async,
    settle,
    settle_async,
    wants_note,
)
from .errors import ConnectRetriesExhausted, one_line, redact
from .policy import Backoff, RetryPolicy, _attempts, _delays, _number
from .replicas import NoReaderAvailable, Route
from .shutdown import PoolClosed

logger = logging.getLogger("fault_tolerant_pool.transaction")

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: Defaults (see docs/transactions.md). Five runs cover a fault per run in a bad minute; the
#: deadline bounds the re-runs, not a run in progress (a statement is never cut by the runner).
DEFAULT_ATTEMPTS: int | None = 5
DEFAULT_DEADLINE = 30.0
DEFAULT_INITIAL_DELAY = 0.05
DEFAULT_MAX_DELAY = 1.0

#: SQLSTATEs after which the whole unit of work runs again, in any phase (COMMIT included): the
#: server answered, and it rolled the transaction back.
CONFLICT_SQLSTATES: dict[str, str] = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
}

#: SQLSTATEs that mean the connection (or its server's role) is gone, besides class ``08``: the
#: transaction was rolled back if they arrive before COMMIT was sent.
CONNECTION_SQLSTATES: dict[str, str] = {
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "25006": "read_only_sql_transaction",  # a demoted writer: the write was refused
}

#: Errors the pool raises after its own retries (its deadline, fail-fast, ``max_waiting``, a
#: shut-down pool, an exhausted ``pool_timeout``): its verdict stands, the runner does not
#: stretch an outage past the pool's ``retry_deadline``.
POOL_VERDICTS: tuple[type[BaseException], ...] = (
    ConnectRetriesExhausted,
    PoolTimeoutError,
    PoolClosed,
    NoReaderAvailable,
)

#: Errors raised at COMMIT that prove COMMIT was never sent: asyncpg refuses to start a query
#: on a connection whose server already said goodbye (its protocol state machine raises before
#: writing). Such a failure is one before COMMIT, safe to run again.
NOT_SENT_MESSAGES: tuple[str, ...] = ("cannot switch to state",)

#: Where a run was when it failed.
Phase = Literal["checkout", "work", "commit"]

Action = Literal["retry", "unknown", "raise"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What the runner does after a failed run, and why (a SQLSTATE or a class name)."""

    action: Action
    reason: str
    commit_cut: bool = False
    """The connection failed while COMMIT was in flight (whatever the action)."""


class TransactionOutcomeUnknown(OperationalError):
    """The connection failed while COMMIT was in flight: the transaction may or may not have
    been committed, and the runner did not run it again (the function is not ``idempotent``).

    A subclass of ``sqlalchemy.exc.OperationalError``; ``orig`` is the driver's error, as on the
    error it replaces (``__cause__``). ``attempts`` counts the runs, this one included.
    """

    attempts: int

    def __init__(self, error: DBAPIError, attempts: int) -> None:
        super().__init__(
            error.statement,
            error.params,
            error.orig,  # type: ignore[arg-type]
            hide_parameters=error.hide_parameters,
            connection_invalidated=True,
            code=None,
        )
        self.attempts = attempts
        detail = one_line(redact(str(error.orig))) or type(error.orig).__name__
        self._detail = (
            f"transaction outcome unknown: the connection failed while COMMIT was in flight "
            f"(run {attempts}); it may or may not have been committed (the server could not "
            f"say), and it was not run again (pass idempotent=True if running it twice is "
            f"harmless). "
            f"{type(error.orig).__name__}: {detail}"
        )

    def __str__(self) -> str:
        return self._detail

    def __reduce__(self) -> Any:  # pickled as a plain OperationalError (keeps the message)
        return (OperationalError, (self._detail, None, self.orig))


def _is_conflict(code: str | None) -> bool:
    return code in CONFLICT_SQLSTATES


def _is_connection_class(error: BaseException, code: str | None) -> bool:
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    if code is not None:
        return code[:2] == "08" or code in CONNECTION_SQLSTATES
    return classify(error).transient


def _pool_verdict(error: BaseException) -> bool:
    if isinstance(error, POOL_VERDICTS):
        return True
    return isinstance(getattr(error, "orig", None), POOL_VERDICTS)


def decide(
    error: BaseException,
    phase: Phase,
    *,
    idempotent: bool = False,
    classifier: Classifier | None = None,
) -> Decision:
    """Whether a failed run may run again: ``retry``, ``unknown`` (COMMIT in flight, not
    idempotent) or ``raise``. Only errors SQLAlchemy raised for the database are considered
    (``DBAPIError``), and, before a connection was handed out, the driver's own connect errors.

    ``classifier`` is asked first: True (may re-run, subject to the COMMIT rule), False (raise)
    or None (the built-in rules).
    """
    code = sqlstate_of(error)
    reason = code or innermost_class(error)
    if _pool_verdict(error):
        return Decision("raise", reason)
    raw_connect_error = phase == "checkout" and isinstance(error, OSError)
    if not isinstance(error, DBAPIError) and not raw_connect_error:
        return Decision("raise", reason)
    verdict = None if classifier is None else classifier(error)
    if verdict is False:
        return Decision("raise", reason)
    if _is_conflict(code):
        return Decision("retry", reason)
    if verdict is None and not _is_connection_class(error, code):
        return Decision("raise", reason)
    if phase == "commit":
        text = " ".join(str(link) for link in _chain(error)).lower()
        if any(fragment in text for fragment in NOT_SENT_MESSAGES):
            return Decision("retry", reason)
        return Decision("retry" if idempotent else "unknown", reason, commit_cut=True)
    return Decision("retry", reason)


class _Run:
    """One run's progress: its phase, where its connection came from (for the counters), and
    what it noted before COMMIT (to settle a COMMIT cut in flight)."""

    __slots__ = ("engine", "note", "phase", "read_only", "result", "settled", "source")

    def __init__(self) -> None:
        self.phase: Phase = "checkout"
        self.source: Any = None
        self.read_only = False
        """Routed as read-only (a router's reads): nothing written, so a COMMIT cut in flight
        changes nothing either and the run may run again."""
        self.engine: Any = None
        """The engine of the run's connection (sync or async), to ask after a cut COMMIT."""
        self.note: CommitNote | None = None
        self.result: Any = None
        self.settled: Settlement | None = None

    def noted(self, note: CommitNote, engine: Any) -> None:
        self.note = note
        self.engine = engine

    @property
    def wrote_nothing(self) -> bool:
        """The transaction had no id before COMMIT: its COMMIT changes nothing."""
        return self.note is not None and self.note.xid is None

    def settle_first(self, decision: Decision) -> bool:
        """Whether to ask the server before deciding: COMMIT cut, the transaction's id noted."""
        return decision.action == "unknown" and self.note is not None and self.settled is None


def _pool_of(source: Any) -> Any:
    """The pool behind an engine, a connection or a session (None when unknown)."""
    try:
        if isinstance(source, AsyncSession):
            source = source.sync_session
        if isinstance(source, Session):
            source = source.get_bind()
        if isinstance(source, AsyncEngine | AsyncConnection):
            source = source.sync_engine
        if isinstance(source, Connection):
            source = source.engine
        return source.pool if isinstance(source, Engine) else None
    except Exception:  # a session without a bind, a closed one: nothing to count on
        return None


def _counters(source: Any) -> Any:
    tolerance = getattr(_pool_of(source), "_fault_tolerance", None)
    return None if tolerance is None else tolerance.counters


@dataclass(frozen=True)
class TransactionRunner:
    """How units of work are re-run: an immutable, validated configuration (copy it with
    :meth:`new`). :meth:`run` runs a sync function, :meth:`run_async` a coroutine function.

    ``attempts`` counts the first run (None: the deadline alone bounds the re-runs);
    ``deadline`` is the time after which no new run starts (a run in progress is never cut);
    the sleep between runs is a full-jitter draw under a cap doubling from ``initial_delay`` to
    ``max_delay``.
    """

    attempts: int | None = DEFAULT_ATTEMPTS
    deadline: float = DEFAULT_DEADLINE
    initial_delay: float = DEFAULT_INITIAL_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    idempotent: bool = False
    """Re-run after a failure while COMMIT was in flight too (running it twice is harmless)."""
    resolve_outcome: bool = True
    """Note the transaction's id before COMMIT (one round trip, PostgreSQL 13+) so that a COMMIT
    cut in flight can be settled by asking the server; off, every such cut is unknown. Not
    needed (and not done) for an ``idempotent`` unit or a router's reads."""
    classifier: Classifier | None = None
    """Asked first about each failure: True (may re-run), False (raise), None (built-in)."""
    random: Callable[[], float] = field(default=_random.random, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    policy: RetryPolicy = field(init=False, repr=False, compare=False)
    """The backoff's configuration, derived from the fields above."""

    def __post_init__(self) -> None:
        attempts = _attempts(self.attempts, "attempts")
        deadline = _number("deadline", self.deadline, minimum=0.0, strict=True)
        initial, maximum = _delays(self.initial_delay, self.max_delay, prefix="")
        for name in ("idempotent", "resolve_outcome"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.classifier is not None and not callable(self.classifier):
            raise ArgumentError(f"classifier must be a callable or None, got {self.classifier!r}")
        object.__setattr__(self, "attempts", attempts)
        object.__setattr__(self, "deadline", deadline)
        object.__setattr__(self, "initial_delay", initial)
        object.__setattr__(self, "max_delay", maximum)
        policy = RetryPolicy(attempts, deadline, initial, maximum, attempt_timeout=None)
        object.__setattr__(self, "policy", policy)

    def new(self, **changes: Any) -> TransactionRunner:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    # -- the loop, sync and async -----------------------------------------------------------------

    def run(self, bind: Engine | sessionmaker[Any] | Route, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(connection)`` (an :class:`~sqlalchemy.engine.Engine`) or ``fn(session)`` (a
        :class:`~sqlalchemy.orm.sessionmaker`) in one transaction, committed; run it again on a
        fresh connection after a failure that leaves nothing behind. Returns what ``fn`` returns.
        """
        attempt = _sync_attempt(bind, fn, self._notes)
        backoff = Backoff(self.policy, self.clock())
        while True:
            run = _Run()
            try:
                return attempt(run)
            except Exception as error:
                decision = self._decide(error, run)
                if run.settle_first(decision):
                    assert run.note is not None
                    run.settled = settle(run.engine, run.note)
                    if run.settled == "committed":
                        committed: _T = self._committed_after_all(error, run, backoff)
                        return committed
                    decision = self._decide(error, run)
                delay = self._after_failure(error, run, backoff, decision)
            time.sleep(delay)

    async def run_async(
        self,
        bind: AsyncEngine | async_sessionmaker[Any] | Route,
        fn: Callable[[Any], Awaitable[_T]],
    ) -> _T:
        """:meth:`run` for asyncio: ``await fn(connection)`` on an
        :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, ``await fn(session)`` on an
        :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`. Cancellation is never caught: a
        cancelled run or sleep leaves no connection or session behind."""
        attempt = _async_attempt(bind, fn, self._notes)
        backoff = Backoff(self.policy, self.clock())
        while True:
            run = _Run()
            try:
                return await attempt(run)
            except Exception as error:
                decision = self._decide(error, run)
                if run.settle_first(decision):
                    assert run.note is not None
                    run.settled = await settle_async(run.engine, run.note)
                    if run.settled == "committed":
                        committed: _T = self._committed_after_all(error, run, backoff)
                        return committed
                    decision = self._decide(error, run)
                delay = self._after_failure(error, run, backoff, decision)
            await asyncio.sleep(delay)

    @property
    def _notes(self) -> bool:
        """Whether a run notes its transaction's id before COMMIT (see ``resolve_outcome``)."""
        return self.resolve_outcome and not self.idempotent

    def _decide(self, error: Exception, run: _Run) -> Decision:
        settled = run.read_only or run.wrote_nothing or run.settled == "not_committed"
        return decide(
            error, run.phase, idempotent=self.idempotent or settled, classifier=self.classifier
        )

    def _committed_after_all(self, error: Exception, run: _Run, backoff: Backoff) -> Any:
        """A COMMIT cut in flight that the server says committed: the run succeeded."""
        counters = _counters(run.source)
        if counters is not None:
            counters.outcome_resolved()
        _record("outcome_resolved", backoff.failures + 1, innermost_class(error), run.phase)
        logger.warning(
            "unit of work run %d: connection failed while COMMIT was in flight (%s, "
            "sqlstate=%s); the server says it committed",
            backoff.failures + 1,
            innermost_class(error),
            sqlstate_of(error),
        )
        return run.result

    def _after_failure(
        self, error: Exception, run: _Run, backoff: Backoff, decision: Decision | None = None
    ) -> float:
        """The sleep before the next run; raises when there is none."""
        if decision is None:
            decision = self._decide(error, run)
        runs = backoff.failures + 1
        if decision.action == "raise":
            raise error
        counters = _counters(run.source)
        if counters is not None and decision.commit_cut:
            # COMMIT cut in flight: settled (nothing written, or the server said it did not
            # commit), or unknown, whether raised below or (idempotent) run again
            settled = run.read_only or run.wrote_nothing or run.settled == "not_committed"
            if settled:
                counters.outcome_resolved()
            else:
                counters.outcome_unknown()
        if decision.action == "unknown":
            _record("outcome_unknown", runs, decision.reason, run.phase)
            logger.warning(
                "unit of work run %d: connection failed while COMMIT was in flight (%s, "
                "sqlstate=%s): outcome unknown, not run again",
                runs,
                innermost_class(error),
                sqlstate_of(error),
            )
            assert isinstance(error, DBAPIError)  # decide() answers "unknown" for no other
            raise TransactionOutcomeUnknown(error, runs) from error
        delay = backoff.next_delay(self.clock(), self.random)
        if delay is None:
            logger.warning(
                "unit of work failed %d time(s) in %.2fs (%s, last %s, %s): giving up",
                backoff.failures,
                backoff.elapsed(self.clock()),
                decision.reason,
                run.phase,
                "attempts exhausted"
                if self.attempts is not None and backoff.failures >= self.attempts
                else "deadline passed",
            )
            raise error
        if counters is not None:
            counters.transaction_retried()
        _record("retry", runs, decision.reason, run.phase)
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "unit of work run %d failed in %s (%s, sqlstate=%s): %s; running it again in %.3fs",
                runs,
                "commit (not committed, the server says)"
                if run.settled == "not_committed"
                else run.phase,
                innermost_class(error),
                sqlstate_of(error),
                one_line(redact(str(getattr(error, "orig", None) or error)))[:300],
                delay,
            )
        return delay


def _record(what: str, runs: int, reason: str, phase: Phase) -> None:
    """An event on the current span (the request's): which run failed, where and why. The
    conventions name no such event: the project's prefix says so (as for the pool's spans)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            f"fault_tolerant_pool.transaction.{what}",
            {
                "fault_tolerant_pool.transaction.attempt": runs,
                "fault_tolerant_pool.transaction.phase": phase,
                "error.type": reason,
            },
        )


# -- one run, for each kind of bind ----------------------------------------------------------------


def _sync_attempt(bind: Any, fn: Callable[[Any], _T], notes: bool) -> Callable[[_Run], _T]:
    """One run of ``fn`` on ``bind``; ``notes``: note the transaction's id before COMMIT."""
    if isinstance(bind, Engine) or (isinstance(bind, Route) and not bind.asynchronous):

        def core(run: _Run) -> _T:
            run.source = bind if isinstance(bind, Engine) else None
            run.read_only = getattr(bind, "read_only", False)
            with bind.connect() as connection:
                run.source = connection
                run.phase = "work"
                transaction = connection.begin()
                result = run.result = fn(connection)
                if notes and not run.read_only and wants_note(connection):
                    run.noted(note(connection), connection.engine)
                run.phase = "commit"
                transaction.commit()
            return result

        return core
    if isinstance(bind, sessionmaker):

        def orm(run: _Run) -> _T:
            with bind() as session:
                run.source = session
                run.read_only = getattr(session, "read_only", False) is True
                session.begin()
                connection = session.connection()  # the checkout, now, not at the first statement
                run.phase = "work"
                result = run.result = fn(session)
                session.flush()  # the last INSERTs and UPDATEs, before COMMIT is sent
                if notes and not run.read_only and wants_note(connection):
                    run.noted(note(connection), connection.engine)
                run.phase = "commit"
                session.commit()
            return result

        return orm
    raise _bind_error(
        "run_transaction", "an Engine, a sessionmaker or a sync router's reads/writes", bind
    )


def _async_attempt(
    bind: Any, fn: Callable[[Any], Awaitable[_T]], notes: bool
) -> Callable[[_Run], Awaitable[_T]]:
    if isinstance(bind, AsyncEngine) or (isinstance(bind, Route) and bind.asynchronous):

        async def core(run: _Run) -> _T:
            run.source = bind if isinstance(bind, AsyncEngine) else None
            run.read_only = getattr(bind, "read_only", False)
            async with bind.connect() as connection:
                run.source = connection
                run.phase = "work"
                transaction = await connection.begin()
                result = run.result = await fn(connection)
                if notes and not run.read_only and wants_note(connection):
                    run.noted(await note_async(connection), connection.engine)
                run.phase = "commit"
                await transaction.commit()
            return result

        return core
    if isinstance(bind, async_sessionmaker):

        async def orm(run: _Run) -> _T:
            async with bind() as session:
                run.source = session
                run.read_only = getattr(session.sync_session, "read_only", False) is True
                await session.begin()
                connection = await session.connection()
                run.phase = "work"
                result = run.result = await fn(session)
                await session.flush()
                if notes and not run.read_only and wants_note(connection):
                    run.noted(await note_async(connection), connection.engine)
                run.phase = "commit"
                await session.commit()
            return result

        return orm
    raise _bind_error(
        "run_transaction_async",
        "an AsyncEngine, an async_sessionmaker or an async router's reads/writes",
        bind,
    )


def _bind_error(where: str, wanted: str, bind: Any) -> ArgumentError:
    hint = ""
    if isinstance(bind, AsyncEngine | async_sessionmaker):
        hint = " (an async bind: use run_transaction_async)"
    elif isinstance(bind, Engine | sessionmaker):
        hint = " (a sync bind: use run_transaction)"
    elif isinstance(bind, Connection | AsyncConnection | Session | AsyncSession):
        hint = " (each run needs a fresh connection: pass the engine or the sessionmaker)"
    return ArgumentError(f"{where}: bind must be {wanted}, got {type(bind).__name__}{hint}")


# -- the calls and the decorator -------------------------------------------------------------------


def run_transaction(
    bind: Engine | sessionmaker[Any] | Route,
    fn: Callable[[Any], _T],
    *,
    attempts: int | None = DEFAULT_ATTEMPTS,
    deadline: float = DEFAULT_DEADLINE,
    idempotent: bool = False,
    resolve_outcome: bool = True,
    classifier: Classifier | None = None,
) -> _T:
    """Run ``fn`` as one re-runnable unit of work: see :meth:`TransactionRunner.run`."""
    return TransactionRunner(
        attempts=attempts,
        deadline=deadline,
        idempotent=idempotent,
        resolve_outcome=resolve_outcome,
        classifier=classifier,
    ).run(bind, fn)


async def run_transaction_async(
    bind: AsyncEngine | async_sessionmaker[Any] | Route,
    fn: Callable[[Any], Awaitable[_T]],
    *,
    attempts: int | None = DEFAULT_ATTEMPTS,
    deadline: float = DEFAULT_DEADLINE,
    idempotent: bool = False,
    resolve_outcome: bool = True,
    classifier: Classifier | None = None,
) -> _T:
    """Run ``await fn(...)`` as one re-runnable unit of work: see
    :meth:`TransactionRunner.run_async`."""
    return await TransactionRunner(
        attempts=attempts,
        deadline=deadline,
        idempotent=idempotent,
        resolve_outcome=resolve_outcome,
        classifier=classifier,
    ).run_async(bind, fn)


@overload
def transactional(
    bind: AsyncEngine | async_sessionmaker[Any], runner: TransactionRunner | None = None
) -> Callable[[Callable[Concatenate[Any, _P], Awaitable[_T]]], Callable[_P, Awaitable[_T]]]: ...


@overload
def transactional(
    bind: Engine | sessionmaker[Any], runner: TransactionRunner | None = None
) -> Callable[[Callable[Concatenate[Any, _P], _T]], Callable[_P, _T]]: ...


@overload
def transactional(bind: Route, runner: TransactionRunner | None = None) -> Any: ...


def transactional(bind: Any, runner: TransactionRunner | None = None) -> Any:
    """Decorate a function whose first parameter is the connection (or session) so that each
    call runs it as a re-runnable unit of work on ``bind``; the caller passes the other
    arguments. A coroutine function needs an async bind, a plain function a sync one.

    The bind is checked when the decorator is applied, not at the first call.
    """
    chosen = runner if runner is not None else TransactionRunner()
    asynchronous = isinstance(bind, AsyncEngine | async_sessionmaker) or (
        isinstance(bind, Route) and bind.asynchronous
    )
    if not asynchronous and not isinstance(bind, Engine | sessionmaker | Route):
        raise _bind_error(
            "transactional",
            "an Engine, a sessionmaker, an AsyncEngine, an async_sessionmaker or a router's "
            "reads/writes",
            bind,
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn) != asynchronous:
            kind = "a coroutine function" if asynchronous else "a plain (sync) function"
            raise ArgumentError(
                f"transactional: {fn.__qualname__} must be {kind} for a {type(bind).__name__} bind"
            )
        if asynchronous:

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return await chosen.run_async(bind, lambda c: fn(c, *args, **kwargs))

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return chosen.run(bind, lambda c: fn(c, *args, **kwargs))

        return run

    return decorate

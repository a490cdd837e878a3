"""The transaction runner's decisions and backoff, without a database and without sleeping."""

from __future__ import annotations

import errno
import logging
import pickle
import types
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from fault_tolerant_pool import TransactionOutcomeUnknown, TransactionRunner
from fault_tolerant_pool.commit_outcome import CommitNote
from fault_tolerant_pool.errors import exhausted_error
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.transaction import (
    CONFLICT_SQLSTATES,
    CONNECTION_SQLSTATES,
    Phase,
    _Run,
    decide,
)

from .fakes import Clock, FakeDBAPI

PHASES: tuple[Phase, ...] = ("checkout", "work", "commit")


def driver_error(sqlstate: str | None = None, message: str = "boom") -> FakeDBAPI.Error:
    error = FakeDBAPI.OperationalError(message)
    error.sqlstate = sqlstate
    return error


def wrapped(
    sqlstate: str | None = None,
    *,
    invalidated: bool = False,
    message: str = "boom",
    cls: type[DBAPIError] = OperationalError,
) -> DBAPIError:
    """What SQLAlchemy raises for a driver's error during a statement."""
    return cls(
        "INSERT INTO t VALUES (1)", None, driver_error(sqlstate, message), False, invalidated
    )


# -- what is re-run --------------------------------------------------------------------------------


@pytest.mark.parametrize("sqlstate", sorted(CONFLICT_SQLSTATES))
@pytest.mark.parametrize("phase", PHASES)
def test_conflicts_are_rerun_in_every_phase(sqlstate: str, phase: Phase) -> None:
    # The server answered (COMMIT included) and rolled the transaction back.
    assert decide(wrapped(sqlstate), phase).action == "retry"


@pytest.mark.parametrize("sqlstate", ["08006", "08003", "08001", *sorted(CONNECTION_SQLSTATES)])
def test_connection_class_failures_before_commit_are_rerun(sqlstate: str) -> None:
    decision = decide(wrapped(sqlstate), "work")
    assert (decision.action, decision.reason) == ("retry", sqlstate)
    assert decide(wrapped(sqlstate), "checkout").action == "retry"


def test_a_disconnect_without_sqlstate_is_rerun_before_commit() -> None:
    error = wrapped(None, invalidated=True, message="connection was closed")
    assert decide(error, "work").action == "retry"


def test_a_psycopg_message_of_a_lost_connection_is_connection_class() -> None:
    error = wrapped(None, message="server closed the connection unexpectedly")
    assert decide(error, "work").action == "retry"


@pytest.mark.parametrize("sqlstate", ["57P01", "08006", "25006"])
def test_a_connection_failure_during_commit_has_an_unknown_outcome(sqlstate: str) -> None:
    decision = decide(wrapped(sqlstate, invalidated=True), "commit")
    assert decision.action == "unknown"
    assert decision.reason == sqlstate
    assert decide(wrapped(sqlstate), "commit", idempotent=True).action == "retry"


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [("23505", IntegrityError), ("42601", DBAPIError), ("57014", OperationalError)],
)
@pytest.mark.parametrize("phase", PHASES)
def test_other_database_errors_are_raised(
    sqlstate: str, cls: type[DBAPIError], phase: Phase
) -> None:
    # A unique violation, a syntax error, a statement_timeout: running again changes nothing.
    assert decide(wrapped(sqlstate, cls=cls), phase).action == "raise"


@pytest.mark.parametrize("phase", PHASES)
def test_the_applications_own_errors_are_raised(phase: Phase) -> None:
    assert decide(ValueError("bad input"), phase).action == "raise"
    assert decide(KeyError("x"), phase).action == "raise"


def test_an_os_error_is_rerun_only_before_a_connection_is_handed_out() -> None:
    # A stock pool lets the driver's own connect error through (asyncpg: ConnectionRefusedError);
    # during the work the same class may be the application's own network call.
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert decide(refused, "checkout").action == "retry"
    assert decide(refused, "work").action == "raise"
    assert decide(refused, "commit").action == "raise"


def test_the_pools_own_verdicts_stand() -> None:
    gave_up = exhausted_error(
        FakeDBAPI,
        attempts=3,
        elapsed=10.0,
        last_error=driver_error("57P03"),
        transient=True,
        error_type="57P03",
    )
    wrapped_give_up = OperationalError(None, None, gave_up)  # type: ignore[arg-type]
    assert decide(wrapped_give_up, "checkout").action == "raise"
    assert decide(PoolTimeoutError("QueuePool limit reached"), "checkout").action == "raise"


def test_the_classifier_is_asked_first() -> None:
    asked: list[BaseException] = []

    def never(error: BaseException) -> bool:
        asked.append(error)
        return False

    error = wrapped("40001")
    assert decide(error, "work", classifier=never).action == "raise"
    assert asked == [error]
    # True makes any database error re-runnable, still subject to the COMMIT rule.
    assert decide(wrapped("23505"), "work", classifier=lambda e: True).action == "retry"
    assert decide(wrapped("23505"), "commit", classifier=lambda e: True).action == "unknown"
    # None defers to the built-in rules.
    assert decide(wrapped("57P01"), "work", classifier=lambda e: None).action == "retry"
    # The application's own errors never reach the classifier.
    assert decide(ValueError("x"), "work", classifier=lambda e: True).action == "raise"


# -- the backoff between runs ----------------------------------------------------------------------


def failing_run(phase: Phase = "work") -> _Run:
    run = _Run()
    run.phase = phase
    return run


def runner(clock: Clock, **kw: Any) -> TransactionRunner:
    return TransactionRunner(clock=clock, random=lambda: 0.5, **kw)


def test_runs_are_spaced_by_full_jitter_under_a_doubling_cap() -> None:
    clock = Clock()
    chosen = runner(clock, attempts=5, initial_delay=0.1, max_delay=0.3)
    backoff = chosen_backoff(chosen, clock)
    delays = []
    for _ in range(4):
        delays.append(chosen._after_failure(wrapped("57P01"), failing_run(), backoff))
        clock.sleep(delays[-1])
    assert delays == pytest.approx([0.05, 0.1, 0.15, 0.15])
    # The fifth failure is the last allowed run: the error itself is raised, unchanged.
    last = wrapped("57P01")
    with pytest.raises(OperationalError) as raised:
        chosen._after_failure(last, failing_run(), backoff)
    assert raised.value is last


def chosen_backoff(chosen: TransactionRunner, clock: Clock) -> Any:
    from fault_tolerant_pool.policy import Backoff

    return Backoff(chosen.policy, clock())


def test_no_run_starts_after_the_deadline() -> None:
    clock = Clock()
    chosen = runner(clock, attempts=None, deadline=2.0, initial_delay=0.5, max_delay=0.5)
    backoff = chosen_backoff(chosen, clock)
    assert chosen._after_failure(wrapped("08006"), failing_run(), backoff) == 0.25
    clock.now += 1.9  # a slow second run
    # The sleep is clamped to what is left of the deadline.
    assert chosen._after_failure(wrapped("08006"), failing_run(), backoff) == pytest.approx(0.1)
    clock.now += 0.2
    error = wrapped("08006")
    with pytest.raises(OperationalError) as raised:
        chosen._after_failure(error, failing_run(), backoff)
    assert raised.value is error


def test_a_non_retryable_error_is_raised_unchanged_and_not_counted() -> None:
    clock = Clock()
    chosen = runner(clock)
    backoff = chosen_backoff(chosen, clock)
    error = ValueError("bad")
    with pytest.raises(ValueError) as raised:
        chosen._after_failure(error, failing_run(), backoff)
    assert raised.value is error
    assert backoff.failures == 0


def test_an_unknown_outcome_raises_its_own_error(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    chosen = runner(clock)
    backoff = chosen_backoff(chosen, clock)
    cut = wrapped(
        "08006",
        invalidated=True,
        message="connection to server at postgresql://app:hunter2@db/app lost",
    )
    with (
        caplog.at_level(logging.WARNING, "fault_tolerant_pool.transaction"),
        pytest.raises(TransactionOutcomeUnknown) as raised,
    ):
        chosen._after_failure(cut, failing_run("commit"), backoff)
    error = raised.value
    assert isinstance(error, OperationalError)
    assert error.orig is cut.orig
    assert error.__cause__ is cut
    assert error.attempts == 1
    assert error.connection_invalidated
    assert "outcome unknown" in str(error) and "COMMIT" in str(error)
    assert "hunter2" not in str(error)
    assert "hunter2" not in caplog.text
    assert "outcome unknown" in caplog.text
    # Pickled (e.g. across a process pool) it stays an OperationalError with its message.
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, OperationalError)
    assert "outcome unknown" in str(copy)


def test_retries_are_logged_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    chosen = runner(clock)
    error = wrapped("57P01", message="terminating connection; password=hunter2")
    with caplog.at_level(logging.WARNING, "fault_tolerant_pool.transaction"):
        chosen._after_failure(error, failing_run(), chosen_backoff(chosen, clock))
    assert "running it again" in caplog.text
    assert "57P01" in caplog.text
    assert "hunter2" not in caplog.text


def test_retries_and_unknown_outcomes_are_counted_on_the_pool() -> None:
    counters = ConnectCounters()
    clock = Clock()
    chosen = runner(clock)
    backoff = chosen_backoff(chosen, clock)
    engine = create_engine("sqlite://")
    # stands for a fault-tolerant pool's FaultTolerance: the counters are all the runner uses
    engine.pool._fault_tolerance = types.SimpleNamespace(counters=counters)  # type: ignore[attr-defined]
    run = failing_run()
    run.source = engine
    chosen._after_failure(wrapped("40001"), run, backoff)
    run.phase = "commit"
    with pytest.raises(TransactionOutcomeUnknown):
        chosen._after_failure(wrapped("08006"), run, backoff)
    snapshot = counters.snapshot(0, 0, 0, 0)
    assert (snapshot.transaction_retries, snapshot.outcomes_unknown) == (1, 1)


def counted_run(phase: Phase, counters: ConnectCounters) -> _Run:
    engine = create_engine("sqlite://")
    engine.pool._fault_tolerance = types.SimpleNamespace(counters=counters)  # type: ignore[attr-defined]
    run = failing_run(phase)
    run.source = engine
    return run


NOTE_ROW = ("731", 4242, "2026-12-05 10:00:00+00 10.0.0.5:5432")


def test_a_commit_cut_is_settled_first_when_the_id_was_noted() -> None:
    chosen = runner(Clock())
    cut = wrapped("08006", invalidated=True)
    run = failing_run("commit")
    assert not run.settle_first(chosen._decide(cut, run))  # nothing noted: nothing to ask
    run.noted(CommitNote.from_row(NOTE_ROW), engine=None)
    assert run.note is not None and run.note.xid == "731" and run.note.pid == 4242
    assert run.settle_first(chosen._decide(cut, run))
    run.settled = "unknown"
    assert not run.settle_first(chosen._decide(cut, run))  # asked once
    # Failures that are not a cut COMMIT are decided as before, without asking.
    work = failing_run("work")
    work.noted(CommitNote.from_row(NOTE_ROW), engine=None)
    assert not work.settle_first(chosen._decide(cut, work))


@pytest.mark.parametrize(
    ("settled", "xid", "action", "counted"),
    [
        ("not_committed", "731", "retry", (1, 0, 1)),
        ("unknown", "731", "raise", (0, 1, 0)),
        (None, None, "retry", (1, 0, 1)),  # wrote nothing: run again without asking
    ],
)
def test_a_settled_commit_cut_runs_again_or_stays_unknown(
    settled: Any, xid: str | None, action: str, counted: tuple[int, int, int]
) -> None:
    counters = ConnectCounters()
    clock = Clock()
    chosen = runner(clock)
    run = counted_run("commit", counters)
    run.noted(CommitNote(xid, 4242, "i"), engine=None)
    run.settled = settled
    cut = wrapped("08006", invalidated=True)
    if action == "retry":
        assert chosen._after_failure(cut, run, chosen_backoff(chosen, clock)) > 0
    else:
        with pytest.raises(TransactionOutcomeUnknown):
            chosen._after_failure(cut, run, chosen_backoff(chosen, clock))
    snapshot = counters.snapshot(0, 0, 0, 0)
    got = (snapshot.transaction_retries, snapshot.outcomes_unknown, snapshot.outcomes_resolved)
    assert got == counted


def test_a_commit_cut_the_server_says_committed_returns_the_result() -> None:
    counters = ConnectCounters()
    clock = Clock()
    chosen = runner(clock)
    run = counted_run("commit", counters)
    run.result = {"id": 7}
    cut = wrapped("08006", invalidated=True)
    assert chosen._committed_after_all(cut, run, chosen_backoff(chosen, clock)) == {"id": 7}
    snapshot = counters.snapshot(0, 0, 0, 0)
    assert (snapshot.transaction_retries, snapshot.outcomes_unknown) == (0, 0)
    assert snapshot.outcomes_resolved == 1


def test_notes_are_taken_unless_idempotent_or_switched_off() -> None:
    assert TransactionRunner()._notes
    assert not TransactionRunner(idempotent=True)._notes  # a cut COMMIT runs again anyway
    assert not TransactionRunner(resolve_outcome=False)._notes


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": "many"}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": -1}, "deadline"),
        ({"deadline": float("nan")}, "deadline"),
        ({"initial_delay": -0.1}, "initial_delay"),
        ({"initial_delay": 1.0, "max_delay": 0.5}, "max_delay"),
        ({"idempotent": "yes"}, "idempotent"),
        ({"resolve_outcome": 1}, "resolve_outcome"),
        ({"classifier": 3}, "classifier"),
    ],
)
def test_bad_settings_name_the_parameter(kw: dict[str, Any], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        TransactionRunner(**kw)


def test_settings_are_an_immutable_value() -> None:
    base = TransactionRunner()
    assert (base.attempts, base.deadline, base.idempotent) == (5, 30.0, False)
    changed = base.new(attempts=None, deadline="12")
    assert (changed.attempts, changed.deadline) == (None, 12.0)
    assert changed.policy.deadline == 12.0 and changed.policy.attempt_timeout is None
    assert base.attempts == 5
    with pytest.raises(AttributeError):
        base.attempts = 3  # type: ignore[misc]
    with pytest.raises(ArgumentError, match="attempts"):
        base.new(attempts=-2)


def test_each_failed_run_is_an_event_on_the_current_span() -> None:
    from tests.otel import Otel

    otel = Otel()
    clock = Clock()
    chosen = runner(clock)
    backoff = chosen_backoff(chosen, clock)
    with otel.tracer.start_as_current_span("POST /orders"):
        chosen._after_failure(wrapped("57P01"), failing_run("work"), backoff)
        with pytest.raises(TransactionOutcomeUnknown):
            chosen._after_failure(
                wrapped("08006", invalidated=True), failing_run("commit"), backoff
            )
    [span] = otel.spans("POST /orders")
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        (
            "fault_tolerant_pool.transaction.retry",
            {
                "fault_tolerant_pool.transaction.attempt": 1,
                "fault_tolerant_pool.transaction.phase": "work",
                "error.type": "57P01",
            },
        ),
        (
            "fault_tolerant_pool.transaction.outcome_unknown",
            {
                "fault_tolerant_pool.transaction.attempt": 2,
                "fault_tolerant_pool.transaction.phase": "commit",
                "error.type": "08006",
            },
        ),
    ]

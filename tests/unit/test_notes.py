"""What the pool keeps per connection record (``record.notes``): who writes each fact, who takes
it, and what a record of another class gets. No database: stand-ins for records and drivers."""

from __future__ import annotations

import types
from typing import Any

from sqlalchemy.pool.base import _ConnectionRecord

from fault_tolerant_pool import watchdog
from fault_tolerant_pool.credentials import Secret, apply_credentials, offer, withdraw
from fault_tolerant_pool.demotion import DemotionWatch
from fault_tolerant_pool.doubt import Doubt
from fault_tolerant_pool.fault_tolerance import StatementSignals
from fault_tolerant_pool.lifetime import LifetimePolicy
from fault_tolerant_pool.liveness import LivenessPolicy
from fault_tolerant_pool.notes import ConnectionNotes, notes_of
from fault_tolerant_pool.setup_retry import SetUpRetriedRecord
from fault_tolerant_pool.stats import ConnectCounters
from fault_tolerant_pool.upkeep import KEEP, Upkeep

from .test_failover_units import ServerError, context_for, psycopg_like


def pool_record() -> SetUpRetriedRecord:
    """The pool's record, not connected (SQLAlchemy's ``__init__`` only keeps the pool)."""
    return SetUpRetriedRecord(types.SimpleNamespace(), connect=False)


def hand_made_record() -> _ConnectionRecord:
    """SQLAlchemy's own record, as its pool suite and a hand-built pool make them."""
    return _ConnectionRecord(types.SimpleNamespace(), connect=False)  # type: ignore[arg-type]


def test_a_pool_record_has_its_notes_before_it_connects() -> None:
    record = pool_record()
    notes = record.notes
    assert isinstance(notes, ConnectionNotes) and notes_of(record) is notes
    assert notes.generation is None and notes.connected_read_only is None
    assert not notes.suspect and notes.checked_out_at is None and notes.offer is None
    assert not hasattr(notes, "__dict__")  # slots only


def test_a_record_of_another_class_gets_notes_at_first_use() -> None:
    record = hand_made_record()
    assert not hasattr(record, "notes")
    notes = notes_of(record)
    assert record.notes is notes and notes_of(record) is notes  # type: ignore[attr-defined]


def test_the_facts_of_a_connection_are_written_again_at_the_next_connect() -> None:
    now = [100.0]
    upkeep = Upkeep(
        LifetimePolicy(max_lifetime=60.0, jitter=0.0), LivenessPolicy(check=False),
        ConnectCounters(), clock=lambda: now[0],
    )  # fmt: skip
    watch = DemotionWatch(False, lambda: None)
    record = pool_record()
    record.dbapi_connection = object()  # type: ignore[assignment]
    notes = record.notes
    upkeep.connected(record, None)
    watch.connected(record, psycopg_like(default_transaction_read_only="off"))
    assert (notes.deadline, notes.generation, notes.fresh) == (160.0, 0, True)
    assert notes.connected_read_only is False
    now[0] = 130.0
    assert upkeep.checkin(record, 0) == KEEP
    assert (notes.last_used, notes.fresh) == (130.0, False)
    upkeep.drain()
    now[0] = 140.0  # a reconnect: SQLAlchemy keeps the record, the pool writes its facts anew
    upkeep.connected(record, None)
    watch.connected(record, psycopg_like(default_transaction_read_only="on"))
    assert record.notes is notes and (notes.last_used, notes.fresh) == (140.0, True)
    assert (notes.deadline, notes.generation) == (200.0, 1)
    assert notes.connected_read_only is True


def rollbacks() -> tuple[Any, list[str]]:
    done: list[str] = []
    rollback = watchdog._rollback_when_suspect(
        lambda connection: done.append("plain"), lambda connection: done.append("bounded")
    )
    return rollback, done


def test_a_failed_statement_bounds_the_next_rollback_only() -> None:
    record = pool_record()
    fairy = types.SimpleNamespace(_connection_record=record)  # SQLAlchemy's proxy
    do_rollback, done = rollbacks()
    watchdog.suspect(record)
    assert record.notes.suspect
    do_rollback(fairy)
    do_rollback(fairy)
    assert done == ["bounded", "plain"] and not record.notes.suspect


def test_a_rollback_without_notes_is_plain() -> None:
    do_rollback, done = rollbacks()
    do_rollback(object())  # a raw DBAPI connection
    do_rollback(types.SimpleNamespace(_connection_record=None))  # a proxy detached from it
    do_rollback(types.SimpleNamespace(_connection_record=hand_made_record()))
    assert done == ["plain"] * 3


def failed_statement(record: Any, driver: Any) -> Any:
    """A ``handle_error`` context: a read-only signal on ``record``'s connection."""
    error = ServerError("cannot execute INSERT in a read-only transaction", "25006")
    return context_for(error, record, driver)


def test_the_engines_listener_takes_a_record_of_any_class() -> None:
    """``handle_error`` sees every connection of the engine: a record SQLAlchemy made itself is
    marked and judged too (its notes made then), without an AttributeError."""
    seen: list[int] = []
    signals = StatementSignals(DemotionWatch(False, lambda: seen.append(1)), Doubt())
    ours, theirs = pool_record(), hand_made_record()
    for record in (ours, theirs):
        context = failed_statement(record, psycopg_like(default_transaction_read_only="on"))
        signals.handle_error(context)
        assert notes_of(record).suspect and context.is_disconnect is False  # nothing at connect
    assert seen == []
    watch = DemotionWatch(False, lambda: seen.append(1))
    watch.connected(theirs, psycopg_like(default_transaction_read_only="off"))
    context = failed_statement(theirs, psycopg_like(default_transaction_read_only="on"))
    watch.handle_error(context)
    assert context.is_disconnect is True and seen == [1]  # writable when made, read-only now


def test_an_offered_secret_is_taken_once() -> None:
    record = pool_record()
    secret = Secret("s3cret", "app", float("inf"))
    offer(record, secret)
    assert record.notes.offer is secret
    cparams: dict[str, Any] = {"user": "from_url", "password": "from_url"}
    apply_credentials(None, record, [], cparams)
    assert cparams == {"user": "app", "password": "s3cret"} and record.notes.offer is None
    assert withdraw(record) is None  # applied: nothing to take back
    offer(record, secret)
    assert withdraw(record) is secret and record.notes.offer is None  # never applied
    untouched: dict[str, Any] = {"password": "from_url"}
    apply_credentials(None, hand_made_record(), [], untouched)  # no notes: nothing offered
    apply_credentials(None, None, [], untouched)
    assert untouched == {"password": "from_url"}

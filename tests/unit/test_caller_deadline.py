"""A caller's own connect deadline (``connects_within``): no database, no sleeping."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fault_tolerant_pool.caller_deadline import connects_within, policy_for
from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.errors import ConnectRetriesExhausted
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.probe import Admission, Gate, ProbeSchedule
from fault_tolerant_pool.stats import ConnectCounters

from .fakes import Clock, FakeDBAPI
from .test_connector import ClockWaiter, refused


def test_the_pools_policy_unless_a_shorter_deadline_is_set() -> None:
    policy = RetryPolicy(deadline=10.0, attempts=7)
    assert policy_for(policy) is policy
    with connects_within(1.5):
        bounded = policy_for(policy)
        with connects_within(20.0):  # longer than the pool's: the pool's stands
            assert policy_for(policy) is policy
        assert policy_for(policy) == bounded
    assert bounded == policy.new(deadline=1.5) and policy.deadline == 10.0
    assert policy_for(policy) is policy  # the block is over


def test_the_deadline_is_the_callers_own() -> None:
    policy = RetryPolicy()
    seen: list[RetryPolicy] = []
    with connects_within(1.5):
        other = threading.Thread(target=lambda: seen.append(policy_for(policy)))
        other.start()
        other.join()
    assert seen == [policy]  # another thread's connects are not bounded


def always_refused(clock: Clock) -> Any:
    def creator(record: Any) -> Any:
        clock.now += 0.001
        raise refused()

    return creator


def connector(clock: Clock, gate: Gate | None = None) -> RetryingConnector:
    return RetryingConnector(
        always_refused(clock),
        RetryPolicy(deadline=10.0),
        ConnectCounters(),
        sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI,
        clock=clock,
        random=lambda: 0.5,
        gate=gate,
    )


def test_a_connect_within_a_callers_deadline_gives_up_by_then() -> None:
    clock = Clock()
    connect = connector(clock)
    started = clock.now
    with connects_within(1.5), pytest.raises(ConnectRetriesExhausted) as raised:
        connect(None)
    assert 1.5 <= clock.now - started <= 1.51 and raised.value.elapsed <= 1.51
    started = clock.now
    with pytest.raises(ConnectRetriesExhausted):
        connect(None)  # outside the block: the pool's own deadline
    assert 10.0 <= clock.now - started <= 10.01


def test_at_the_gate_a_caller_waits_for_the_probe_until_its_own_deadline_only() -> None:
    clock = Clock()
    gate = Gate(
        10.0,
        schedule=ProbeSchedule(hedge_limit=0),  # nobody tries beside a probe in flight
        clock=clock,
        random=lambda: 0.5,
        waiter=lambda in_loop: ClockWaiter(clock),
    )
    connect = connector(clock, gate)
    assert gate.enter(clock.now + 10.0, in_loop=False) is Admission.GO
    gate.finished(clock.now, refused(), clock.now, clock.now)  # the pool is failing
    clock.now += 1.0
    assert gate.enter(clock.now + 10.0, in_loop=False) is Admission.GO  # a probe, held
    started = clock.now
    with connects_within(1.5), pytest.raises(ConnectRetriesExhausted):
        connect(None)  # never admitted: it waited for the probe, until its own deadline
    assert clock.now - started == pytest.approx(1.5)
    assert gate.state == "failing"  # fail-fast still comes after the pool's retry_deadline

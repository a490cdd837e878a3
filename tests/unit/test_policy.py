"""Backoff and validation, without a database and without sleeping (clock and random injected)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool.policy import Backoff, RetryPolicy


def test_backoff_cap_doubles_then_clamps() -> None:
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.5)
    assert [policy.backoff_cap(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]


def test_full_jitter_scales_the_random_draw() -> None:
    backoff = Backoff(RetryPolicy(initial_delay=0.1, max_delay=10.0, deadline=100.0), started=0.0)
    assert backoff.next_delay(now=0.0, random=lambda: 0.5) == pytest.approx(0.05)
    assert backoff.next_delay(now=0.1, random=lambda: 0.5) == pytest.approx(0.1)
    assert backoff.next_delay(now=0.2, random=lambda: 0.0) == 0.0
    assert backoff.failures == 3


def test_huge_failure_count_does_not_overflow() -> None:
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.5)
    assert policy.backoff_cap(10_000) == 0.5


def test_attempts_count_the_first_try() -> None:
    backoff = Backoff(RetryPolicy(attempts=3, deadline=100.0), started=0.0)
    assert backoff.next_delay(0.0, lambda: 0.5) is not None
    assert backoff.next_delay(0.0, lambda: 0.5) is not None
    assert backoff.next_delay(0.0, lambda: 0.5) is None
    assert backoff.failures == 3


def test_last_sleep_is_clamped_to_the_deadline() -> None:
    backoff = Backoff(RetryPolicy(initial_delay=1.0, max_delay=1.0, deadline=2.0), started=10.0)
    assert backoff.next_delay(now=11.7, random=lambda: 0.999) == pytest.approx(0.3)


def test_no_attempt_starts_after_the_deadline() -> None:
    backoff = Backoff(RetryPolicy(deadline=2.0), started=10.0)
    assert backoff.next_delay(now=12.0, random=lambda: 0.5) is None
    assert backoff.elapsed(12.5) == 2.5


def test_deadline_bounds_a_simulated_outage() -> None:
    """Drive the loop with a fake clock: total sleep never exceeds the deadline."""
    policy = RetryPolicy(deadline=3.0, initial_delay=0.05, max_delay=0.5)
    now = 0.0
    backoff = Backoff(policy, started=now)
    draws = iter([0.99, 0.01, 0.5, 0.99] * 100)
    sleeps = []
    while (delay := backoff.next_delay(now, lambda: next(draws))) is not None:
        sleeps.append(delay)
        now += delay + 0.001  # each refused attempt takes a millisecond
    assert sum(sleeps) <= 3.0
    assert now == pytest.approx(3.0, abs=0.01)
    assert all(s <= 0.5 for s in sleeps)


def test_stop_counts_a_permanent_failure() -> None:
    backoff = Backoff(RetryPolicy(), started=0.0)
    backoff.stop()
    assert backoff.failures == 1


@pytest.mark.parametrize(
    ("arguments", "value"),
    [
        ({"retry_attempts": "5", "retry_deadline": "2.5"}, RetryPolicy(attempts=5, deadline=2.5)),
        ({"retry_attempts": "none"}, RetryPolicy(attempts=None)),
        ({"retry_attempts": None}, RetryPolicy(attempts=None)),
        (
            {"retry_initial_delay": "0", "retry_max_delay": "0"},
            RetryPolicy(initial_delay=0.0, max_delay=0.0),
        ),
    ],
)
def test_config_strings_are_coerced(arguments: dict[str, object], value: RetryPolicy) -> None:
    assert RetryPolicy.from_arguments(**arguments) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"retry_attempts": 0}, "retry_attempts"),
        ({"retry_attempts": -1}, "retry_attempts"),
        ({"retry_attempts": 2.5}, "retry_attempts"),
        ({"retry_attempts": "many"}, "retry_attempts"),
        ({"retry_attempts": True}, "retry_attempts"),
        ({"retry_deadline": 0}, "retry_deadline"),
        ({"retry_deadline": -3}, "retry_deadline"),
        ({"retry_deadline": "soon"}, "retry_deadline"),
        ({"retry_deadline": float("inf")}, "retry_deadline"),
        ({"retry_deadline": float("nan")}, "retry_deadline"),
        ({"retry_initial_delay": -0.1}, "retry_initial_delay"),
        ({"retry_max_delay": None}, "retry_max_delay"),
        ({"retry_initial_delay": 2.0, "retry_max_delay": 1.0}, "retry_max_delay"),
    ],
)
def test_bad_values_name_the_parameter(arguments: dict[str, object], named: str) -> None:
    with pytest.raises(ArgumentError, match=named):
        RetryPolicy.from_arguments(**arguments)  # type: ignore[arg-type]


def test_policy_is_immutable_and_copied_with_new() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.deadline = 1.0  # type: ignore[misc]
    assert policy.new(deadline=1.0).deadline == 1.0
    assert policy.deadline == 10.0

"""When a connect attempt in flight counts as held: a pure moving average, no clock."""

from __future__ import annotations

import pytest

from fault_tolerant_pool.hedge import CEILING, FACTOR, FLOOR, INITIAL, LoginTimes


def test_before_any_login_the_delay_is_rfc_8305s_recommended_250_ms() -> None:
    assert LoginTimes().held_after == INITIAL == 0.25


def test_fast_logins_bring_it_down_to_the_floor_not_below() -> None:
    logins = LoginTimes()
    for _ in range(40):
        logins.observe(0.003)
    assert logins.held_after == FLOOR
    assert logins.typical == pytest.approx(0.003, rel=0.05)


def test_one_login_held_then_served_moves_it_by_a_quarter_at_most() -> None:
    logins = LoginTimes()
    for _ in range(40):
        logins.observe(0.05)
    before = logins.typical
    logins.observe(2.0)  # held by a proxy for 2 s, then served
    assert logins.typical == pytest.approx(before * 1.25)
    assert logins.held_after == pytest.approx(FACTOR * before * 1.25)


def test_a_slow_network_raises_it_within_a_few_dozen_logins_up_to_the_ceiling() -> None:
    logins = LoginTimes()
    seen = []
    for _ in range(30):
        logins.observe(0.4)  # a far region: 400 ms logins
        seen.append(logins.held_after)
    assert seen == sorted(seen)
    assert logins.held_after == pytest.approx(1.6, rel=0.02)  # 4 x 0.4 s
    for _ in range(30):
        logins.observe(5.0)
    assert logins.held_after == CEILING


def test_a_negative_duration_from_a_clock_step_counts_as_zero() -> None:
    logins = LoginTimes()
    logins.observe(-1.0)
    assert logins.typical == pytest.approx(0.75 * INITIAL / FACTOR)

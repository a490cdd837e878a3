"""When a connection whose set-up failed is made again: pure logic, no database."""

from __future__ import annotations

import asyncio

from fault_tolerant_pool.setup_retry import set_up_again


class AdminShutdown(Exception):
    sqlstate = "57P01"


class InsufficientPrivilege(Exception):
    sqlstate = "42501"


def test_only_transient_errors_with_tries_left_are_set_up_again() -> None:
    assert set_up_again(AdminShutdown("terminating connection"), None, 1)
    assert set_up_again(ConnectionResetError("reset by peer"), None, 3)
    assert not set_up_again(AdminShutdown("terminating connection"), None, 0)
    assert not set_up_again(InsufficientPrivilege("permission denied"), None, 3)
    assert not set_up_again(ValueError("a listener's bug"), None, 3)


def test_a_cancellation_or_an_exit_is_never_retried() -> None:
    assert not set_up_again(asyncio.CancelledError(), None, 3)
    assert not set_up_again(KeyboardInterrupt(), None, 3)


def test_the_applications_classifier_is_asked_first() -> None:
    assert set_up_again(ValueError("flaky"), lambda error: True, 1)
    assert not set_up_again(AdminShutdown("terminating"), lambda error: False, 1)
    assert set_up_again(AdminShutdown("terminating"), lambda error: None, 1)  # None: the tables

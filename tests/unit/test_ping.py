"""``retry_ping``: a new connection's first round trip happens inside the retry loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from fault_tolerant_pool import FaultTolerantNullPool, FaultTolerantQueuePool
from fault_tolerant_pool.connector import RetryingConnector
from fault_tolerant_pool.errors import ConnectRetriesExhausted
from fault_tolerant_pool.policy import RetryPolicy
from fault_tolerant_pool.stats import ConnectCounters

from .test_timeouts import Clock, FakeDBAPI

URL = "postgresql+psycopg://u:secret@127.0.0.1:1/db"


class LoginFailing(FakeDBAPI.OperationalError):
    sqlstate = "08P01"  # PgBouncer: server login has been failing, try again later


def make(pings: list[BaseException | None]) -> tuple[RetryingConnector, list[str], list[str]]:
    """A connector whose creator hands out conn1, conn2, ... and whose ping of each raises the
    next error of ``pings`` (None: the ping succeeds)."""
    made: list[str] = []
    discarded: list[str] = []
    clock = Clock()

    def creator(record: Any) -> str:
        made.append(f"conn{len(made) + 1}")
        return made[-1]

    def ping(connection: str) -> None:
        error = pings.pop(0)
        if error is not None:
            raise error

    connector = RetryingConnector(
        creator, RetryPolicy(attempts=3), ConnectCounters(), sleep=clock.sleep,
        dbapi=lambda: FakeDBAPI, clock=clock, random=lambda: 0.5, ping=ping,
        discard=discarded.append,
    )  # fmt: skip
    return connector, made, discarded


def test_a_failed_ping_discards_the_connection_and_retries() -> None:
    connector, made, discarded = make([LoginFailing("server login has been failing"), None])
    assert connector(None) == "conn2"
    assert made == ["conn1", "conn2"] and discarded == ["conn1"]
    assert connector.counters.failed_attempts == 1 and connector.counters.connects == 1


def test_pings_failing_to_the_end_give_up_with_the_pings_error() -> None:
    connector, made, discarded = make([LoginFailing("server login has been failing")] * 3)
    with pytest.raises(ConnectRetriesExhausted) as info:
        connector(None)
    assert isinstance(info.value.last_error, LoginFailing) and info.value.attempts == 3
    assert discarded == made == ["conn1", "conn2", "conn3"]


def test_a_cancelled_ping_discards_the_connection() -> None:
    connector, made, discarded = make([asyncio.CancelledError()])
    with pytest.raises(asyncio.CancelledError):
        connector(None)
    assert discarded == made == ["conn1"]


@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
def test_setting_is_auto_by_default_coerced_and_kept(poolclass: type) -> None:
    engine = sa.create_engine(URL, poolclass=poolclass)
    assert engine.pool._fault_tolerance.ping is None  # type: ignore[attr-defined]
    assert engine.pool._invoke_creator.doubt is not None  # type: ignore[attr-defined]
    engine = sa.create_engine(URL, poolclass=poolclass, retry_ping="false")
    assert engine.pool._invoke_creator.ping is None  # type: ignore[attr-defined]
    config = {"sqlalchemy.url": URL, "sqlalchemy.retry_ping": "true"}
    engine = sa.engine_from_config(config, poolclass=poolclass)
    engine.dispose()
    assert engine.pool._fault_tolerance.ping is True  # type: ignore[attr-defined]
    assert engine.pool._invoke_creator.ping is not None  # type: ignore[attr-defined]
    for bad in ("maybe", 2, None):
        with pytest.raises(ArgumentError, match="retry_ping"):
            sa.create_engine(URL, poolclass=poolclass, retry_ping=bad)

"""Engine creation: one class name for sync and async, settings validated at create time."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from fault_tolerant_pool import (
    FaultTolerantAsyncQueuePool,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
)

URL = "postgresql+{driver}://u:secret@127.0.0.1:1/db"


def test_one_name_for_sync_and_async_engines() -> None:
    sync = sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool)
    assert type(sync.pool) is FaultTolerantQueuePool
    assert isinstance(sync.pool, QueuePool) and not isinstance(sync.pool, AsyncAdaptedQueuePool)
    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(URL.format(driver=driver), poolclass=FaultTolerantQueuePool)
        pool = engine.sync_engine.pool
        assert type(pool) is FaultTolerantAsyncQueuePool
        assert isinstance(pool, FaultTolerantQueuePool) and isinstance(pool, AsyncAdaptedQueuePool)
        null = create_async_engine(URL.format(driver=driver), poolclass=FaultTolerantNullPool)
        assert type(null.sync_engine.pool) is FaultTolerantNullPool


def test_sqlalchemy_pool_arguments_still_reach_the_pool() -> None:
    engine = create_async_engine(
        URL.format(driver="asyncpg"),
        poolclass=FaultTolerantQueuePool,
        pool_size=3,
        max_overflow=2,
        pool_timeout=4,
        pool_recycle=60,
        pool_pre_ping=True,
        pool_use_lifo=True,
        retry_deadline=2,
    )
    pool: Any = engine.sync_engine.pool
    assert (pool.size(), pool._max_overflow, pool.timeout(), pool._recycle, pool._pre_ping) == (
        3, 2, 4, 60, True,
    )
    assert pool.retry_policy.deadline == 2.0


@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"retry_deadline": -1}, "retry_deadline"),
        ({"retry_deadline": "abc"}, "retry_deadline"),
        ({"retry_attempts": 0}, "retry_attempts"),
        ({"retry_initial_delay": -1}, "retry_initial_delay"),
        ({"retry_max_delay": "x"}, "retry_max_delay"),
        ({"retry_classifier": "not callable"}, "retry_classifier"),
    ],
)
def test_bad_settings_are_refused_at_engine_creation(
    poolclass: type, kw: dict[str, Any], named: str
) -> None:
    with pytest.raises(ArgumentError, match=named):
        sa.create_engine(URL.format(driver="psycopg"), poolclass=poolclass, **kw)
    with pytest.raises(ArgumentError, match=named):
        create_async_engine(URL.format(driver="asyncpg"), poolclass=poolclass, **kw)


def test_unknown_argument_is_still_refused() -> None:
    with pytest.raises(TypeError, match="retry_deadlin"):
        sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool,
                         retry_deadlin=3)


def test_engine_from_config_strings_are_coerced() -> None:
    config = {
        "sqlalchemy.url": URL.format(driver="psycopg"),
        "sqlalchemy.pool_size": "4",
        "sqlalchemy.retry_attempts": "6",
        "sqlalchemy.retry_deadline": "2.5",
        "sqlalchemy.retry_initial_delay": "0.01",
        "sqlalchemy.retry_max_delay": "0.25",
    }
    engine = sa.engine_from_config(config, poolclass=FaultTolerantQueuePool)
    policy = engine.pool.retry_policy  # type: ignore[attr-defined]
    assert (policy.attempts, policy.deadline, policy.initial_delay, policy.max_delay) == (
        6, 2.5, 0.01, 0.25,
    )
    assert engine.pool.size() == 4  # type: ignore[attr-defined]
    config["sqlalchemy.retry_attempts"] = "None"
    engine = sa.engine_from_config(config, poolclass=FaultTolerantQueuePool)
    assert engine.pool.retry_policy.attempts is None  # type: ignore[attr-defined]


def test_no_password_in_pool_repr_or_policy() -> None:
    engine = sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool)
    assert "secret" not in repr(engine.pool) + repr(engine.pool.retry_policy)  # type: ignore[attr-defined]

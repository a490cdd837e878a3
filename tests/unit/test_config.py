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
        ({"credentials": 42}, "credentials"),
        ({"credentials": "no_such_module_q:x"}, "credentials"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"lifetime_jitter": 1.5}, "lifetime_jitter"),
        ({"max_idle": "forever"}, "max_idle"),
        ({"liveness_check": "sometimes"}, "liveness_check"),
        ({"liveness_ping_after": -1}, "liveness_ping_after"),
        ({"fail_fast": "sometimes"}, "fail_fast"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"max_waiting": "many"}, "max_waiting"),
        ({"max_waiting": 2.5}, "max_waiting"),
        ({"leak_threshold": 0}, "leak_threshold"),
        ({"leak_threshold": "soon"}, "leak_threshold"),
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


def test_checkout_settings_from_config_survive_dispose() -> None:
    config = {
        "sqlalchemy.url": URL.format(driver="psycopg"),
        "sqlalchemy.credentials": "os:getcwd",
        "sqlalchemy.max_lifetime": "1800",
        "sqlalchemy.lifetime_jitter": "0.1",
        "sqlalchemy.max_idle": "600",
        "sqlalchemy.liveness_check": "false",
        "sqlalchemy.liveness_ping_after": "none",
        "sqlalchemy.overflow_idle": "12.5",
    }
    engine = sa.engine_from_config(config, poolclass=FaultTolerantQueuePool)
    ft = engine.pool._fault_tolerance  # type: ignore[attr-defined]
    assert ft.overflow_idle == 12.5
    assert (ft.lifetime.max_lifetime, ft.lifetime.jitter, ft.lifetime.max_idle) == (1800, 0.1, 600)
    assert (ft.liveness.check, ft.liveness.ping_after) == (False, None)
    assert ft.credentials is not None and ft.credentials.name.endswith(".getcwd")
    engine.dispose()
    assert engine.pool._fault_tolerance is ft  # type: ignore[attr-defined]


def test_checkout_defaults() -> None:
    engine = sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool)
    ft = engine.pool._fault_tolerance  # type: ignore[attr-defined]
    assert ft.credentials is None
    lifetime = ft.lifetime
    assert (lifetime.max_lifetime, lifetime.jitter, lifetime.max_idle) == (None, 0.25, None)
    assert (ft.liveness.check, ft.liveness.ping_after) == (True, 1.0)
    assert ft.overflow_idle == 30.0


def test_credentials_need_an_engine() -> None:
    with pytest.raises(ArgumentError, match="credentials= needs an engine"):
        FaultTolerantQueuePool(lambda: None, credentials=lambda: "pw")


@pytest.mark.parametrize("poolclass", [FaultTolerantQueuePool, FaultTolerantNullPool])
def test_create_engine_passes_every_setting_to_both_pool_classes(poolclass: type) -> None:
    """SQLAlchemy passes a pool only what its scan of the ``__init__`` ladder finds: every
    setting must be found (they are keyword-only, named for the scan by SettingNames)."""
    from sqlalchemy.util import get_cls_kwargs

    from fault_tolerant_pool.pool import POOL_ARGUMENTS

    assert set(POOL_ARGUMENTS) <= get_cls_kwargs(poolclass)
    engine = sa.create_engine(
        URL.format(driver="psycopg"), poolclass=poolclass, retry_deadline=3, pool_name="x"
    )
    settings = engine.pool._fault_tolerance.settings  # type: ignore[attr-defined]
    assert (settings.retry_deadline, settings.pool_name) == (3.0, "x")


def test_sqlalchemy_positional_order_holds() -> None:
    """``QueuePool(creator, 5)`` sets pool_size: the settings are keyword-only, so a pool built
    by hand takes SQLAlchemy's positional arguments as the stock class does."""
    import inspect

    from sqlalchemy.pool import QueuePool

    pool = FaultTolerantQueuePool(lambda: None, 3, 7, 4.5, True)
    stock = QueuePool(lambda: None, 3, 7, 4.5, True)
    assert (pool.size(), pool._max_overflow, pool._timeout, pool._pool.use_lifo) == (
        stock.size(), stock._max_overflow, stock._timeout, stock._pool.use_lifo,
    )  # fmt: skip
    assert pool._fault_tolerance.settings.retry_attempts is None  # not set by the 3
    parameters = inspect.signature(FaultTolerantQueuePool).parameters
    assert list(parameters)[:5] == ["creator", "pool_size", "max_overflow", "timeout", "use_lifo"]
    assert parameters["retry_deadline"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        FaultTolerantQueuePool(lambda: None, 3, 7, 4.5, True, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def test_the_settings_carrier_is_never_called() -> None:
    from fault_tolerant_pool.settings import NAMES, SettingNames

    with pytest.raises(TypeError, match="never called"):
        SettingNames(**dict.fromkeys(NAMES))


def test_fail_fast_and_max_waiting_from_config_survive_dispose() -> None:
    config = {
        "sqlalchemy.url": URL.format(driver="psycopg"),
        "sqlalchemy.fail_fast": "false",
        "sqlalchemy.max_waiting": "50",
    }
    engine = sa.engine_from_config(config, poolclass=FaultTolerantQueuePool)
    gate = engine.pool._fault_tolerance.gate  # type: ignore[attr-defined]
    assert (gate.fail_fast, gate.room.limit, gate.deadline) == (False, 50, 10.0)
    engine.dispose()
    assert engine.pool._fault_tolerance.gate is gate  # type: ignore[attr-defined]
    defaults = sa.create_engine(URL.format(driver="psycopg"), poolclass=FaultTolerantNullPool)
    gate = defaults.pool._fault_tolerance.gate  # type: ignore[attr-defined]
    assert (gate.fail_fast, gate.room.limit) == (True, None)
    for off in (None, 0, "0", "none"):
        engine = sa.create_engine(
            URL.format(driver="psycopg"), poolclass=FaultTolerantQueuePool, max_waiting=off
        )
        assert engine.pool._fault_tolerance.gate.room.limit is None  # type: ignore[attr-defined]

"""Credentials against a real PostgreSQL with password (SCRAM) logins: rotation, stale, failing.

Every flavour (asyncpg, psycopg async, psycopg sync) and both pool classes. The role ``app`` is
created per test; the URL carries a wrong password, so every login uses the provider's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import sqlalchemy as sa

from fault_tolerant_pool import (
    ConnectRetriesExhausted,
    CredentialsError,
    FaultTolerantNullPool,
    FaultTolerantQueuePool,
)
from fault_tolerant_pool.testing import PostgresServer

from .client import ASYNC_FLAVOURS, FLAVOURS, POOLS, Client

pytestmark = [pytest.mark.anyio, pytest.mark.db]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
pools = pytest.mark.parametrize("poolclass", POOLS, ids=lambda p: p.__name__)

FIRST, SECOND = "first-Pw-4a7c", "second-Pw-91be"


class Rotating:
    """A secret store: answers the current password for an hour; async for async engines."""

    def __init__(self, password: str, is_async: bool) -> None:
        self.password = password
        self.calls = 0
        self.is_async = is_async
        self.name = "test-secret-store"

    def answer(self) -> dict[str, Any]:
        self.calls += 1
        return {"user": "app", "password": self.password, "expires_in": 3600}

    def get_credentials(self) -> Any:
        if not self.is_async:
            return self.answer()

        async def later() -> dict[str, Any]:
            await asyncio.sleep(0.002)
            return self.answer()

        return later()


def app_client(server: PostgresServer, flavour: str, poolclass: type, **kw: Any) -> Client:
    server.create_role("app", FIRST)
    return Client(
        server.url(flavour, user="app", password="not-the-password"),
        flavour,
        poolclass=poolclass,
        **kw,
    )


@flavours
@pools
async def test_rotation_under_traffic_fails_no_request(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    store = Rotating(FIRST, flavour in ASYNC_FLAVOURS)
    # Short lifetimes keep a queue pool making new logins all along; a NullPool logs in on
    # every checkout.
    extra = {"max_lifetime": 0.3} if poolclass is FaultTolerantQueuePool else {}
    client = app_client(pg_server, flavour, poolclass, credentials=store, **extra)
    stop = asyncio.Event()
    outcomes: list[tuple[float, bool]] = []

    async def worker() -> None:
        while not stop.is_set():
            first, second = await client.checkout_then("SELECT 1")
            outcomes.append((time.monotonic(), first and second))

    workers = [asyncio.create_task(worker()) for _ in range(6)]
    await asyncio.sleep(0.3)
    # A connection checked out before the rotation and used after it (longer than its
    # lifetime, too: a checked-out connection is never retired).
    held = asyncio.create_task(client.backend_pids(pause=1.0))
    await asyncio.sleep(0.3)
    connects_before = client.stats().connects
    # Rotate: the store publishes the new password, then the role takes it.
    store.password = SECOND
    await asyncio.to_thread(pg_server.execute, f"ALTER ROLE app PASSWORD '{SECOND}'")
    rotated_at = time.monotonic()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)
    first_pid, second_pid = await held
    stats = client.stats()
    await client.dispose()

    assert [ok for _, ok in outcomes].count(False) == 0
    assert sum(1 for at, _ in outcomes if at > rotated_at) > 20
    assert first_pid == second_pid  # the connection made before the rotation kept working
    assert stats.connects - connects_before >= 3  # new logins happened after the rotation...
    assert stats.credential_refreshes == 1  # ...the first with the old password was refused once
    assert stats.give_ups == 0
    assert store.calls == 2  # cached: asked once at start, once after the refusal
    assert len(outcomes) > 20 * store.calls


@flavours
@pools
async def test_stale_password_first_one_refresh_then_success(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    answers = iter([
        {"password": "stale-Pw-000", "expires_in": 3600},
        {"password": FIRST, "expires_in": 3600},
    ])  # fmt: skip
    calls: list[int] = []

    def provider() -> dict[str, Any]:
        calls.append(1)
        return next(answers)

    client = app_client(pg_server, flavour, poolclass, credentials=provider)
    assert await client.scalar("SELECT current_user") == "app"
    assert await client.scalar("SELECT current_user") == "app"
    stats = client.stats()
    assert len(calls) == 2
    assert (stats.credential_fetches, stats.credential_refreshes) == (2, 1)
    assert stats.failed_attempts == 1 and stats.give_ups == 0
    assert stats.last_error is not None and stats.last_error.sqlstate == "28P01"
    await client.dispose()


@flavours
@pools
async def test_wrong_password_after_the_refresh_is_permanent(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    client = app_client(
        pg_server, flavour, poolclass, credentials=lambda: "wrong-Pw-123", retry_deadline=10
    )
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await client.scalar()
    assert time.monotonic() - started < 2.0
    orig = info.value.orig
    assert isinstance(orig, ConnectRetriesExhausted) and orig.transient is False
    assert orig.attempts == 2  # the first refusal re-asked the provider once
    assert "wrong-Pw-123" not in str(info.value)
    await client.dispose()


@flavours
@pools
async def test_failing_provider_is_a_clear_error(
    pg_server: PostgresServer, flavour: str, poolclass: type
) -> None:
    def vault() -> str:
        raise PermissionError("vault token expired")

    client = app_client(pg_server, flavour, poolclass, credentials=vault)
    with pytest.raises(sa.exc.OperationalError) as info:
        await client.scalar()
    orig = info.value.orig
    assert isinstance(orig, ConnectRetriesExhausted)
    assert isinstance(orig.last_error, CredentialsError)
    message = str(info.value)
    assert "credentials provider" in message and "vault" in message
    assert "PermissionError: vault token expired" in message
    assert client.stats().attempts == 1 and client.stats().connects == 0
    assert client.stats().checked_out == 0
    await client.dispose()


async def test_credentials_survive_dispose_without_asking_again(pg_server: PostgresServer) -> None:
    store = Rotating(FIRST, is_async=True)
    client = app_client(pg_server, "asyncpg", FaultTolerantNullPool, credentials=store)
    assert await client.scalar("SELECT 1") == 1
    await client.dispose()
    assert await client.scalar("SELECT 1") == 1
    assert store.calls == 1
    await client.dispose()

"""Capture the exceptions each driver raises inside the pool for real connect failures.

``python -m tests.db.capture`` starts a throwaway server and writes
``tests/data/connect_errors.json``, the table the classification unit tests rebuild exceptions
from; ``test_classify_live.py`` runs the same capture and checks the drivers still match it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool
from fault_tolerant_pool.testing import PostgresServer
from fault_tolerant_pool.testing.server import free_port

TABLE = Path(__file__).resolve().parent.parent / "data" / "connect_errors.json"
DRIVERS = (("asyncpg", True), ("psycopg_async", True), ("psycopg", False))


def describe(exc: BaseException) -> list[dict[str, Any]]:
    """The exception chain as data: class, message, SQLSTATE, errno, and how each link wraps."""
    chain: list[dict[str, Any]] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 6:
        cls = type(current)
        link: dict[str, Any] = {
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "message": str(current),
        }
        if isinstance(current, OSError):
            link["errno"] = current.errno
            link["strerror"] = current.strerror
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str):
            link["sqlstate"] = sqlstate
        orig = getattr(current, "orig", None)
        link["via"] = "orig" if isinstance(orig, BaseException) else "cause"
        chain.append(link)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return chain


def first_failure(url: str, is_async: bool) -> BaseException:
    """Connect once through the pool and return the exception the pool's classifier was shown."""
    seen: list[BaseException] = []

    def record(exc: BaseException) -> None:
        seen.append(exc)

    kw: dict[str, Any] = {
        "poolclass": FaultTolerantNullPool, "retry_attempts": 1, "retry_classifier": record
    }
    if is_async:

        async def run() -> None:
            engine = create_async_engine(url, **kw)
            try:
                async with engine.connect():
                    pass
            except sa.exc.DBAPIError:
                pass
            finally:
                await engine.dispose()

        asyncio.run(run())
    else:
        engine = sa.create_engine(url, **kw)
        try:
            with engine.connect():
                pass
        except sa.exc.DBAPIError:
            pass
        engine.dispose()
    assert seen, f"no failure captured for {url}"
    return seen[0]


def capture_cases(server: PostgresServer) -> list[dict[str, Any]]:
    """Provoke each failure for each driver flavour; the server is left stopped."""
    cases: list[dict[str, Any]] = []
    server.create_role("limited", "pw", connection_limit=0)
    dead = free_port()
    for driver, is_async in DRIVERS:
        scenarios = {
            "refused": (server.url(driver, port=dead), True),
            "bad_password": (server.url(driver, password="wrong"), False),
            "unknown_database": (server.url(driver, dbname="nope"), False),
            "unknown_role": (server.url(driver, user="ghost", password="x"), False),
            "role_connection_limit": (server.url(driver, user="limited", password="pw"), True),
        }
        for name, (url, transient) in scenarios.items():
            chain = describe(first_failure(url, is_async))
            cases.append({"driver": driver, "case": name, "transient": transient, "chain": chain})
    # A smart shutdown waits for open sessions and refuses new ones with 57P03 meanwhile.
    holder = psycopg.connect(
        host=server.host, port=server.port, user=server.user,
        password=server.password, dbname="postgres",
    )  # fmt: skip
    server.stop(mode="smart", wait=False)
    try:
        for driver, is_async in DRIVERS:
            chain = describe(first_failure(server.url(driver), is_async))
            case = {"driver": driver, "case": "shutting_down", "transient": True, "chain": chain}
            cases.append(case)
    finally:
        holder.close()
    server.stop(mode="fast")
    return cases


def main() -> None:
    with PostgresServer() as server:
        cases = capture_cases(server)
    TABLE.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {TABLE}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Capture the exceptions each driver raises inside the pool for real connect failures.

Writes ``tests/data/connect_errors.json``, the table the classification unit tests rebuild the
exceptions from. Run it against a throwaway server (it starts one)::

    .venv/bin/python tools/capture_connect_errors.py
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from fault_tolerant_pool import FaultTolerantNullPool
from fault_tolerant_pool.testing import PostgresServer

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "connect_errors.json"


def describe(exc: BaseException) -> list[dict[str, Any]]:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def capture(url: str, is_async: bool) -> list[dict[str, Any]]:
    seen: list[BaseException] = []

    def record(exc: BaseException) -> None:
        seen.append(exc)
        return None

    kw: dict[str, Any] = {
        "poolclass": FaultTolerantNullPool, "retry_attempts": 1, "retry_classifier": record
    }
    if is_async:
        async def run() -> None:
            engine = create_async_engine(url, **kw)
            try:
                async with engine.connect():
                    pass
            except Exception:
                pass
            finally:
                await engine.dispose()

        asyncio.run(run())
    else:
        engine = sa.create_engine(url, **kw)
        try:
            with engine.connect():
                pass
        except Exception:
            pass
        engine.dispose()
    assert seen, f"no failure captured for {url}"
    return describe(seen[0])


def main() -> None:
    cases: list[dict[str, Any]] = []
    with PostgresServer() as server:
        server.create_role("limited", "pw", connection_limit=0)
        dead = free_port()
        drivers = [("asyncpg", True), ("psycopg_async", True), ("psycopg", False)]
        for driver, is_async in drivers:
            scenarios = {
                "refused": (server.url(driver).replace(f":{server.port}/", f":{dead}/"), True),
                "bad_password": (server.url(driver, password="wrong"), False),
                "unknown_database": (server.url(driver, dbname="nope"), False),
                "unknown_role": (server.url(driver, user="ghost", password="x"), False),
                "role_connection_limit": (server.url(driver, user="limited", password="pw"), True),
            }
            for name, (url, transient) in scenarios.items():
                cases.append({"driver": driver, "case": name, "transient": transient,
                              "chain": capture(url, is_async)})
        # A smart shutdown waits for open sessions and refuses new ones with 57P03.
        holder = threading.Event()
        import psycopg

        conn = psycopg.connect(host=server.host, port=server.port, user=server.user,
                               password=server.password, dbname="postgres")
        server.stop(mode="smart", wait=False)
        for driver, is_async in drivers:
            cases.append({"driver": driver, "case": "shutting_down", "transient": True,
                          "chain": capture(server.url(driver), is_async)})
        conn.close()
        holder.set()
    OUT.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()

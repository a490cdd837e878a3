"""The README's quickstarts, run as they are written against a throwaway PostgreSQL and PgBouncer.

Each ```python block of the README's "Quickstart" section is executed with only its host and port
replaced by the test server's (the role ``app`` with password ``secret`` and the database ``app``
are made for it); the engine it builds must then run statements.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from fault_tolerant_pool.testing import PgBouncer, PostgresServer

pytestmark = [pytest.mark.anyio, pytest.mark.db]

README = Path(__file__).resolve().parents[2] / "README.md"

#: The hosts the quickstarts name, and what they stand for here.
HOSTS = {"@db/app": "postgres", "@pgbouncer:6432/app": "pgbouncer"}


def quickstart_blocks() -> list[str]:
    text_ = README.read_text()
    section = text_.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)


BLOCKS = quickstart_blocks()


def test_the_quickstart_section_has_its_three_recipes() -> None:
    urls = [re.search(r'"(postgresql\+\w+://[^"]+)"', block) for block in BLOCKS]
    assert [url.group(1) if url else None for url in urls] == [
        "postgresql+asyncpg://app:secret@db/app",
        "postgresql+psycopg://app:secret@pgbouncer:6432/app",
        "postgresql+psycopg://app:secret@db/app",
    ]


@pytest.fixture
def app_server(pg_server: PostgresServer) -> PostgresServer:
    pg_server.create_role("app", "secret")
    pg_server.create_database("app", owner="app")
    return pg_server


@pytest.fixture
def app_bouncer(app_server: PostgresServer) -> Iterator[PgBouncer]:
    with PgBouncer(app_server, users={"app": "secret"}) as bouncer:
        yield bouncer


def run_block(block: str, server: PostgresServer, bouncer: PgBouncer | None) -> Any:
    """Execute a quickstart with the test's host and port; the ``engine`` it made."""
    code = block.replace("@db/app", f"@{server.host}:{server.port}/app")
    if bouncer is not None:
        code = code.replace("@pgbouncer:6432/app", f"@{bouncer.host}:{bouncer.port}/app")
    assert code != block, "the quickstart's URL was not found"
    namespace: dict[str, Any] = {}
    exec(compile(code, f"{README.name} quickstart", "exec"), namespace)
    return namespace["engine"]


STATEMENT = text("SELECT current_user, current_database(), CAST(:n AS int) + 1")


@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=["async", "pgbouncer", "sync"][: len(BLOCKS)]
)
async def test_the_quickstart_runs(
    index: int, app_server: PostgresServer, request: pytest.FixtureRequest
) -> None:
    block = BLOCKS[index]
    through = next(kind for host, kind in HOSTS.items() if host in block)
    bouncer = request.getfixturevalue("app_bouncer") if through == "pgbouncer" else None
    engine = run_block(block, app_server, bouncer)
    assert type(engine.pool).__name__.startswith("FaultTolerant")
    if isinstance(engine, AsyncEngine):
        # several transactions: behind PgBouncer each may land on another server connection
        for n in range(10):
            async with engine.connect() as conn:
                row = (await conn.execute(STATEMENT, {"n": n})).one()
            assert tuple(row) == ("app", "app", n + 1)
        await engine.dispose()
    else:
        assert isinstance(engine, Engine)
        for n in range(10):
            with engine.connect() as conn:
                assert tuple(conn.execute(STATEMENT, {"n": n}).one()) == ("app", "app", n + 1)
        engine.dispose()
    if bouncer is not None:
        clients = [row for row in bouncer.show("STATS") if row.get("database") == "app"]
        assert clients and int(clients[0]["total_xact_count"]) >= 10  # it went through PgBouncer

"""The demo's reads on the standby: ``GET /notes/`` through a ReplicaRouter (issue 23).

With the embedded primary and standby the demo routes its reads over both servers, each by its
own URL: the standby takes them, and ``/health`` and ``/metrics`` count them per server (by port,
never by host). Through a failover the router notices the promoted standby and the reads go to
the writer, none failing; once the standby is rebuilt on the old writer's port it takes them
again. ``DEMO_READ_URLS`` does the same for a ``DATABASE_URL`` of the user's.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from demo import Settings
from demo.embedded import EmbeddedDatabase
from fault_tolerant_pool.testing import PostgresServer

from .helpers import running_app, wait_for_database

pytestmark = [pytest.mark.anyio, pytest.mark.db]

READERS = 4
FAILOVER = {"x-demo-action": "failover"}
REBUILD = {"x-demo-action": "rebuild-standby"}


@dataclass(frozen=True)
class Read:
    phase: str
    status: int
    body: dict[str, Any]


class Traffic:
    """Readers (``GET /notes/`` and ``GET /notes/{id}``) and one writer in tasks of their own,
    until :meth:`stop`. The test's own task never writes: a write would keep the reads of its
    context, and of the tasks it starts later, on the writer (read-your-writes)."""

    def __init__(self, client: httpx.AsyncClient, known_id: int) -> None:
        self.client = client
        self.known_id = known_id
        self.phase = "calm"
        self.reads: list[Read] = []
        self.writes: list[int] = []
        self._stopped = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reader(n)) for n in range(READERS)]
        self._tasks.append(asyncio.create_task(self._writer()))

    async def stop(self) -> None:
        self._stopped = True
        await asyncio.gather(*self._tasks)

    async def _reader(self, n: int) -> None:
        i = 0
        while not self._stopped:
            i += 1
            if i % 3:
                response = await self.client.get("/notes/", params={"limit": 5})
            else:
                response = await self.client.get(f"/notes/{self.known_id}")
            self.reads.append(Read(self.phase, response.status_code, response.json()))
            await asyncio.sleep(0.01)

    async def _writer(self) -> None:
        while not self._stopped:
            response = await self.client.post("/notes/", json={"text": "traffic"})
            self.writes.append(response.status_code)
            await asyncio.sleep(0.05)

    def failed(self) -> list[Read]:
        return [r for r in self.reads if r.status != 200]


async def reads_health(client: httpx.AsyncClient) -> dict[str, Any]:
    reads: dict[str, Any] = (await client.get("/health")).json()["reads"]
    return reads


def by_port(reads: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {server["port"]: server for server in reads["servers"]}


async def wait_for_reads(
    client: httpx.AsyncClient, done: Callable[[dict[str, Any]], object], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reads = await reads_health(client)
        if done(reads):
            return reads
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen: {reads}")


async def seed(client: httpx.AsyncClient) -> int:
    """A note written from a task of its own, then read back (on the standby) once replayed."""
    note = await asyncio.create_task(client.post("/notes/", json={"text": "seed"}))
    assert note.status_code == 201, note.text
    note_id = int(note.json()["id"])
    deadline = time.monotonic() + 10
    while (await client.get(f"/notes/{note_id}")).status_code != 200:
        assert time.monotonic() < deadline, "the standby never showed the note"
        await asyncio.sleep(0.05)
    return note_id


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in:\n{text}")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_reads_land_on_the_standby_and_ride_through_a_failover(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str
) -> None:
    primary, standby = pg_primary_standby
    a, b = primary.port, standby.port
    database = EmbeddedDatabase(primary, standby)
    database.state = "running"  # the fixtures started them
    settings = Settings(database_url=database.url(driver), service_name="reads-test")
    try:
        async with running_app(settings, database) as (_, client):
            reads = await reads_health(client)
            assert reads["routed"] is True and reads["max_replica_lag"] == 5.0
            servers = by_port(reads)
            assert [(s["name"], s["port"]) for s in reads["servers"]] == [
                ("reader 1", a), ("reader 2", b),
            ]  # fmt: skip
            # The router's first checks ran at startup: the primary takes no reads.
            assert servers[a]["role"] == "primary" and servers[a]["in_rotation"] is False
            assert servers[b]["role"] == "standby" and servers[b]["in_rotation"] is True
            known_id = await seed(client)

            # Calm: every read lands on the standby and is counted there.
            traffic = Traffic(client, known_id)
            traffic.start()
            await asyncio.sleep(1.0)
            calm_reads = len(traffic.reads)  # each was routed before /health counts below
            calm = await reads_health(client)
            assert calm_reads > 10
            assert by_port(calm)[b]["reads"] >= calm_reads
            assert by_port(calm)[a]["reads"] == 0
            assert calm["writer"] == {
                "reads": 0, "fallbacks": 0, "read_your_writes": 0, "reasons": {},
            }  # fmt: skip
            assert calm["last"]["route"] == "reader" and calm["last"]["port"] == b
            text = (await client.get("/metrics")).text
            reader_metric = metric(
                text, "demo_reads_total", server="reader 2", port=str(b), route="reader"
            )
            assert reader_metric >= calm_reads
            assert metric(text, "demo_reads_in_rotation", server="reader 2") == 1.0
            assert metric(text, "demo_reads_in_rotation", server="reader 1") == 0.0
            # Ports and names only: no host, URL or password.
            shown = "\n".join(line for line in text.splitlines() if "demo_reads" in line)
            shown += (await client.get("/health")).text
            for secret in ("127.0.0.1", primary.password, "postgresql"):
                assert secret not in shown

            # Fail over under the reads: the standby is promoted, the router notices, and the
            # reads go to the writer (the promoted standby, found by the engine's URL).
            traffic.phase = "failover"
            started = await client.post("/_demo/failover?gap=0.5", headers=FAILOVER)
            assert started.status_code == 202, started.text
            await wait_for_database(
                client,
                lambda d: d["failovers"] and d["failovers"][-1]["promoted_at"]
                and d["state"] == "running",
                "the failover",
            )  # fmt: skip
            promoted = await wait_for_reads(
                client,
                lambda r: by_port(r)[b]["role"] == "primary" and r["writer"]["reads"] > 0,
                "the router noticing the promoted standby",
            )
            traffic.phase = "after failover"
            await asyncio.sleep(1.0)
            after = await reads_health(client)
            servers = by_port(after)
            assert servers[b]["in_rotation"] is False and servers[a]["in_rotation"] is False
            assert servers[a]["role"] == "primary", "the demoted writer is not in recovery"
            assert servers[b]["reads"] == by_port(promoted)[b]["reads"], "no read goes there"
            assert after["writer"]["reads"] > promoted["writer"]["reads"]
            assert after["writer"]["fallbacks"] == after["writer"]["reads"]
            assert after["writer"]["reasons"].get("no_standby", 0) > 0
            assert after["last"]["route"] == "writer" and after["last"]["reason"] == "no_standby"
            text = (await client.get("/metrics")).text
            assert metric(text, "demo_reads_on_writer_total", reason="no_standby") > 0
            assert metric(text, "demo_reads_total", server="writer", route="fallback") > 0

            # The second click: a fresh standby on the old writer's port takes the reads again.
            traffic.phase = "rebuild"
            rebuild = await client.post("/_demo/rebuild-standby", headers=REBUILD)
            assert rebuild.status_code == 202, rebuild.text
            await wait_for_database(
                client,
                lambda d: [s["role"] for s in d["servers"]] == ["standby", "primary"],
                "the rebuild",
            )
            rebuilt = await wait_for_reads(
                client, lambda r: by_port(r)[a]["in_rotation"], "the rebuilt standby in rotation"
            )
            traffic.phase = "after rebuild"
            await asyncio.sleep(1.0)
            await traffic.stop()
            final = await reads_health(client)
            assert by_port(final)[a]["reads"] > by_port(rebuilt)[a]["reads"]
            assert final["last"]["route"] == "reader" and final["last"]["port"] == a

            names = ("calm", "failover", "after failover", "rebuild", "after rebuild")
            phases = {p: sum(1 for r in traffic.reads if r.phase == p) for p in names}
            print(
                f"\n{driver}: reads by phase {phases}, on the writer {final['writer']}, "
                f"run again {final['run_again']}"
            )
            # Through it all no read failed, and the writes carried on too.
            assert all(phases.values()), phases
            assert not traffic.failed(), traffic.failed()[:5]
            assert set(traffic.writes) == {201}
    finally:
        database.destroy()


async def test_demo_read_urls_route_reads_to_the_replicas_given(
    pg_primary_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    """A DATABASE_URL of the user's with DEMO_READ_URLS: the same router, no embedded database."""
    primary, standby = pg_primary_standby
    settings = Settings(database_url=primary.url("asyncpg"), read_urls=(standby.url("asyncpg"),))
    async with running_app(settings) as (_, client):
        known_id = await seed(client)
        for _ in range(5):
            assert (await client.get("/notes/")).status_code == 200
        response = await client.get("/health")
        reads = response.json()["reads"]
        [server] = reads["servers"]
        assert server["name"] == "reader 1" and server["port"] == standby.port
        assert server["role"] == "standby" and server["in_rotation"] is True
        assert server["reads"] >= 6 and reads["writer"]["reads"] == 0
        assert (await client.get(f"/notes/{known_id}")).json()["text"] == "seed"
        for secret in (primary.password, standby.url("asyncpg"), "127.0.0.1"):
            assert secret not in response.text
        assert not re.search(r"postgres(ql)?(\+\w+)?://", response.text)

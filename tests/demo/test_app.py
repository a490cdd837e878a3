"""The demo app in-process (httpx over ASGI, lifespan run) against a real throwaway PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from demo import Settings
from demo.embedded import EmbeddedDatabase
from fault_tolerant_pool.testing import PgBouncer, PostgresServer

from .helpers import running_app

pytestmark = [pytest.mark.anyio, pytest.mark.db]


def assert_no_secret(text: str, server: PostgresServer, password: str | None = None) -> None:
    """No password, URL or server address in what the demo shows the world."""
    for secret in (password or server.password, server.url("asyncpg"), f":{server.port}"):
        assert secret not in text
    assert "Traceback" not in text


async def test_every_endpoint(pg_server: PostgresServer) -> None:
    settings = Settings(database_url=pg_server.url("asyncpg"), service_name="test-demo")
    async with running_app(settings) as (_, client):
        version = await client.get("/pg_version/")
        assert version.status_code == 200
        assert version.json()["version"].startswith("PostgreSQL 1")

        written = []
        for text in ("first", "second", "third"):
            response = await client.post("/notes/", json={"text": text})
            assert response.status_code == 201, response.text
            written.append(response.json())
        assert [n["text"] for n in written] == ["first", "second", "third"]
        assert len({n["id"] for n in written}) == 3
        # A write says which server took it (the page shows writes move in a failover).
        for note in written:
            assert note.pop("server_port") == pg_server.port
            assert note.pop("server_in_recovery") is False

        one = await client.get(f"/notes/{written[1]['id']}")
        assert one.status_code == 200 and one.json() == written[1]
        assert (await client.get("/notes/987654321")).status_code == 404
        assert (await client.post("/notes/", json={"text": ""})).status_code == 422

        listing = (await client.get("/notes/", params={"limit": 2})).json()
        assert listing["count"] == 3
        assert [n["text"] for n in listing["notes"]] == ["third", "second"]

        response = await client.get("/health")
        assert response.status_code == 200
        health = response.json()
        assert health["status"] == "ok"
        pool = health["pool"]
        assert pool["class"] == "FaultTolerantAsyncQueuePool"
        assert pool["size"] == 5 and pool["used"] == 0 and pool["idle"] >= 1
        assert pool["connect_attempts"] >= 1 and pool["connect_failures"] == 0
        assert pool["last_error"] is None
        assert health["database"] == {
            "driver": "asyncpg", "embedded": False, "state": "external", "can_restart": False,
        }  # fmt: skip
        # 3 writes, 1 read by id, 1 listing, 1 version; the 404 and the 422 are client errors
        assert health["requests"]["ok"] == 6 and health["requests"]["unavailable"] == 0
        assert_no_secret(response.text, pg_server)

        history = (await client.get("/health/history")).json()
        assert history["samples"], "the sampler records one sample at startup"
        assert {"t", "idle", "used", "attempts", "failures", "db"} <= set(history["samples"][0])
        after = history["samples"][-1]["t"]
        newer = (await client.get("/health/history", params={"after": after})).json()["samples"]
        assert all(s["t"] > after for s in newer)

        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        attempts = re.search(
            r'^demo_pool_connect_attempts_total\{pool="test-demo"\} (\S+)$', text, re.M
        )
        assert attempts and float(attempts.group(1)) == pool["connect_attempts"]
        assert 'demo_pool_connections{pool="test-demo",state="idle"}' in text
        assert re.search(r'^demo_requests_total\{outcome="ok",pool="test-demo"\} (\d+)', text, re.M)
        assert_no_secret(text, pg_server)

        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "fault_tolerant_pool demo" in page.text and "/health/history" in page.text

        # Only a demo that runs its own database can restart it.
        restart = await client.post("/_demo/restart-db", headers={"x-demo-action": "restart-db"})
        assert restart.status_code in (404, 405)


@pytest.mark.parametrize("pool", ["queue", "null"])
async def test_psycopg_and_both_pools(pg_server: PostgresServer, pool: str) -> None:
    url = pg_server.url("psycopg")  # postgresql+psycopg:// -> psycopg's async flavour
    async with running_app(Settings(database_url=url, pool=pool)) as (_, client):  # type: ignore[arg-type]
        assert (await client.get("/pg_version/")).status_code == 200
        note = (await client.post("/notes/", json={"text": "psycopg"})).json()
        assert (await client.get(f"/notes/{note['id']}")).json()["text"] == "psycopg"
        health = (await client.get("/health")).json()
        expected = "FaultTolerantNullPool" if pool == "null" else "FaultTolerantAsyncQueuePool"
        assert health["pool"]["class"] == expected
        assert health["database"]["driver"] == "psycopg_async"


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_null_pool_through_pgbouncer_in_transaction_mode(
    pgbouncer: PgBouncer, driver: str
) -> None:
    """The PgBouncer setting: no named prepared statements survive transaction pooling."""
    settings = Settings(database_url=pgbouncer.url(driver), pool="null")
    async with running_app(settings) as (_, client):

        async def write_and_read(n: int) -> int:
            note = await client.post("/notes/", json={"text": f"via pgbouncer {n}"})
            assert note.status_code == 201, note.text
            again = await client.get(f"/notes/{note.json()['id']}")
            assert again.status_code == 200, again.text
            version = await client.get("/pg_version/")
            assert version.status_code == 200, version.text
            return int(note.json()["id"])

        ids = await asyncio.gather(*(write_and_read(n) for n in range(12)))
        assert len(set(ids)) == 12
        assert (await client.get("/notes/")).json()["count"] == 12
        pool = (await client.get("/health")).json()["pool"]
        assert pool["class"] == "FaultTolerantNullPool"
        assert pool["connects"] >= 12 and pool["used"] == 0


async def test_database_down_is_a_clean_503(pg_server: PostgresServer) -> None:
    settings = Settings(database_url=pg_server.url("asyncpg"), retry_deadline=0.5)
    async with running_app(settings) as (_, client):
        assert (await client.get("/pg_version/")).status_code == 200
        await asyncio.to_thread(pg_server.stop, "fast")

        response = await client.get("/pg_version/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["error"] == "database unavailable"
        assert body["reason"] == "connect_retries_exhausted"
        assert body["error_class"] == "ConnectionRefusedError"
        assert re.fullmatch(r"could not connect after \d+ attempts in 0\.\d+s", body["detail"])
        assert_no_secret(response.text, pg_server)

        write = await client.post("/notes/", json={"text": "lost"})
        # a whole deadline of failure has passed: the pool fails fast (issue 11)
        assert write.status_code == 503
        assert write.json()["reason"] in ("connect_retries_exhausted", "database_unreachable")

        health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        # the first gives up at the deadline; after a whole deadline of failure the pool fails
        # fast (issue 11), so the second may be refused at once
        assert health["pool"]["give_ups"] + health["pool"]["fast_failures"] >= 2
        assert health["pool"]["last_error"]["class"] == "ConnectionRefusedError"
        assert health["requests"]["unavailable"] == 2
        assert_no_secret(json.dumps(health), pg_server)
        metrics = (await client.get("/metrics")).text
        assert re.search(r'^demo_requests_total\{outcome="unavailable",.*\} 2\.0$', metrics, re.M)


async def test_wrong_password_is_a_clean_503_without_the_password(
    pg_server: PostgresServer,
) -> None:
    pg_server.create_role("app", "first-Secret-1", superuser=True)
    url = pg_server.url("asyncpg", user="app", password="first-Secret-1")
    async with running_app(Settings(database_url=url)) as (app, client):
        assert (await client.get("/pg_version/")).status_code == 200
        pg_server.execute("ALTER ROLE app PASSWORD 'second-Secret-2'")
        await app.state.demo.engine.dispose()  # the next checkout must log in again

        response = await client.get("/pg_version/")
        assert response.status_code == 503
        body = response.json()
        assert body["reason"] == "connect_failed"
        assert body["sqlstate"] == "28P01"
        assert "permanent error, not retried" in body["detail"]
        for text in (response.text, (await client.get("/health")).text):
            assert_no_secret(text, pg_server, password="first-Secret-1")
            assert "second-Secret-2" not in text


async def test_restart_endpoint(pg_server: PostgresServer) -> None:
    database = EmbeddedDatabase(pg_server)
    database.state = "running"  # the fixture started it
    settings = Settings(database_url=pg_server.url("asyncpg"))
    async with running_app(settings, database) as (_, client):
        assert (await client.post("/_demo/restart-db")).status_code == 403  # no header
        headers = {"x-demo-action": "restart-db"}
        started = await client.post("/_demo/restart-db?down_for=0.3", headers=headers)
        assert started.status_code == 202
        assert started.json() == {"restart": 1, "down_for": 0.3, "state": "stopping"}
        again = await client.post("/_demo/restart-db", headers=headers)
        assert again.status_code == 409

        for _ in range(300):
            health = (await client.get("/health")).json()
            restarts = health["database"]["restarts"]
            if restarts and restarts[0]["started_at"] and health["database"]["state"] == "running":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the restart did not finish: {health}")
        assert restarts[0]["started_at"] - restarts[0]["stopped_at"] >= 0.3
        assert (await client.get("/pg_version/")).status_code == 200

    async with running_app(settings, database, client_address=("192.0.2.7", 40000)) as (_, c):
        response = await c.post("/_demo/restart-db", headers={"x-demo-action": "restart-db"})
        assert response.status_code == 403, "only from this machine"

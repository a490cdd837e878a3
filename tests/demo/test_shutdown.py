"""The demo's leak card and its graceful shutdown: Ctrl-C lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import httpx
import pytest

from demo import Settings
from demo.app import database_error_body
from fault_tolerant_pool import PoolClosed
from fault_tolerant_pool.testing import PostgresServer

from .helpers import demo_process, running_app

pytestmark = pytest.mark.db


@pytest.mark.anyio
async def test_a_long_hold_is_a_leak_on_the_health_page(
    pg_server_session: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fault_tolerant_pool.leak")
    settings = Settings(database_url=pg_server_session.url("asyncpg"), leak_threshold=0.3)
    async with running_app(settings) as (_, client):
        assert (await client.post("/_demo/hold", params={"seconds": 1})).status_code == 403
        headers = {"x-demo-action": "hold"}
        held = asyncio.ensure_future(
            client.post("/_demo/hold", params={"seconds": 0.8}, headers=headers)
        )
        await asyncio.sleep(0.6)
        during = (await client.get("/health")).json()["pool"]
        assert (await held).status_code == 200
        after = (await client.get("/health")).json()["pool"]
        metrics = (await client.get("/metrics")).text
    assert during["oldest_checkout_age"] >= 0.5 and during["leak_threshold"] == 0.3
    assert during["leaks"] == 1 and after["leaks"] == 1 and after["oldest_checkout_age"] == 0.0
    assert 'demo_pool_leaks_total{pool="fault-tolerant-pool-demo"} 1.0' in metrics
    assert "demo_pool_oldest_checkout_age_seconds{" in metrics
    (report,) = [r.getMessage() for r in caplog.records if "connection leak" in r.getMessage()]
    assert "demo/db.py" in report and "in hold_connection" in report


def test_a_closed_pool_is_a_503_saying_so() -> None:
    body = database_error_body(PoolClosed("the pool is shut down"))
    assert body["reason"] == "shutting_down" and body["error_class"] == "PoolClosed"


def test_ctrl_c_lets_in_flight_requests_finish(pg_server: PostgresServer) -> None:
    env = {"DATABASE_URL": pg_server.url("asyncpg"), "DEMO_SHUTDOWN_TIMEOUT": "5"}
    with demo_process(env=env) as demo:
        answers: list[int | str] = []

        def slow_request() -> None:
            try:
                with httpx.Client(base_url=demo.base_url, timeout=30) as client:
                    response = client.post(
                        "/_demo/hold", params={"seconds": 2}, headers={"x-demo-action": "hold"}
                    )
                    answers.append(response.status_code)
            except httpx.HTTPError as error:
                answers.append(type(error).__name__)

        request = threading.Thread(target=slow_request)
        request.start()
        assert _wait_for_backend(pg_server), "the slow request never reached the database"
        assert demo.stop(signal.SIGINT) == 0, demo.output
        request.join(timeout=10)
    assert answers == [200], demo.output
    assert "demo stopped" in demo.output and "Traceback" not in demo.output
    assert "connection leak" not in demo.output
    assert pg_server.backend_count() == 0  # the lifespan closed every connection


def _wait_for_backend(server: PostgresServer, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
            " AND pid <> pg_backend_pid()"
        )
        if int(rows[0][0]):
            return True
        time.sleep(0.05)
    return False

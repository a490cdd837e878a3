"""The demo's main command, ``python -m demo``, as a user runs it: a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket

import httpx
import pytest

from _fault_tolerant_pool_pytest import _require
from fault_tolerant_pool.testing import PostgresServer

from .helpers import OtlpReceiver, demo_process, run_demo, wait_until

pytestmark = pytest.mark.db


def command_output(*args: str, timeout: float = 90) -> str:
    """What ``python -m demo ARGS`` (a command to the running demo) printed; it must succeed."""
    result = run_demo(*args, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_embedded_database_serves_restarts_traces_and_stops_cleanly() -> None:
    from fault_tolerant_pool.testing import find_postgres_bindir

    _require(find_postgres_bindir)  # skip (or, in CI, fail) without PostgreSQL
    with OtlpReceiver() as otlp:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "demo-under-test",
        }
        with demo_process(env=env) as demo:
            database = demo.banner_value("database")
            match = re.search(r"127\.0\.0\.1:(\d+) \(throwaway, data in (\S+),", database)
            assert match, database
            pg_port, workdir = int(match.group(1)), match.group(2)
            assert os.path.isdir(workdir)
            # By default the throwaway PostgreSQL has a streaming standby (the fail-over button).
            standby = re.search(r"standby on 127\.0\.0\.1:(\d+) ", demo.banner_value("standby"))
            assert standby, demo.output
            standby_port = int(standby.group(1))
            assert "FaultTolerantQueuePool (asyncpg" in demo.banner_value("pool")
            assert demo.banner_value("traces") == f"OTLP/HTTP to {otlp.endpoint}"

            with httpx.Client(base_url=demo.base_url, timeout=30) as client:
                response = client.get("/pg_version/")
                assert response.status_code == 200
                assert response.json()["version"].startswith("PostgreSQL")
                assert client.post("/notes/", json={"text": "kept"}).status_code == 201

                metrics = client.get("/metrics").text
                # OpenTelemetry through the global MeterProvider's Prometheus reader ...
                assert re.search(
                    r'^http_server_request_duration_seconds_count\{.*http_route="/pg_version/"'
                    r'.*otel_scope_name="demo".*\} 1\.0$', metrics, re.M,
                ), metrics  # fmt: skip
                assert 'service_name="demo-under-test"' in metrics  # target_info
                # ... and the pool's own counters.
                assert 'demo_pool_connects_total{pool="demo-under-test"}' in metrics
                # the pool's own OpenTelemetry metrics, through the demo's global provider
                assert "db_client_connection_count{" in metrics
                assert "fault_tolerant_pool_connect_attempts_total{" in metrics

                # The second command restarts the embedded database while the demo runs.
                restart = command_output("restart-db", "--url", demo.base_url, "--down-for", "0.5")
                assert "restart 1: stopping the embedded PostgreSQL" in restart
                assert re.search(r"back: accepting connections \d+\.\d+s after", restart)
                assert client.get("/pg_version/").status_code == 200
                assert client.get("/notes/").json()["count"] == 1
                health = client.get("/health").json()
                assert health["database"]["embedded"] is True
                assert health["database"]["state"] == "running"
                assert len(health["database"]["restarts"]) == 1
                assert health["database"]["can_fail_over"] is True
                assert [(s["port"], s["role"]) for s in health["database"]["servers"]] == [
                    (pg_port, "primary"), (standby_port, "standby"),
                ]  # fmt: skip
                # The standby followed the restarted primary.
                assert wait_until(
                    lambda: client.get("/_demo/servers").json()["servers"][1]["in_recovery"]
                    is True, 10,
                )  # fmt: skip

                # A third command fails it over; the next write lands on the promoted standby.
                assert "python -m demo failover-db --url" in demo.banner_value("failover")
                failover = command_output("failover-db", "--url", demo.base_url, "--gap", "0.2")
                assert f"failover 1: 127.0.0.1:{pg_port} turned read-only, promoting " \
                    f"127.0.0.1:{standby_port} in 0.2s" in failover  # fmt: skip
                assert f"done: 127.0.0.1:{standby_port} is the primary" in failover
                # (a write that meets the demoted writer is run again on the new primary)
                note = client.post("/notes/", json={"text": "after"})
                assert note.status_code == 201 and note.json()["server_port"] == standby_port
                rebuild = command_output("rebuild-standby", "--url", demo.base_url)
                assert f"done: 127.0.0.1:{pg_port} is a standby again" in rebuild

                # A fourth runs the chaos mix on the writer and prints each step as it ends.
                assert "python -m demo chaos-db --url" in demo.banner_value("chaos")
                chaos = command_output(
                    "chaos-db", "--url", demo.base_url, "--pause", "0.5", timeout=120
                )
                assert f"chaos mix 1 on 127.0.0.1:{standby_port}: terminate, restart, crash, " \
                    "terminate, 0.5s apart" in chaos  # fmt: skip
                for step in ("1/4 terminate every client session", "2/4 fast restart",
                             "3/4 crash", "4/4 terminate every client session again"):  # fmt: skip
                    assert f"  step {step}" in chaos, chaos
                assert re.search(r"done\. Requests so far: \d+ ok, 0 answered 503", chaos)
                assert client.post("/notes/", json={"text": "after chaos"}).status_code == 201

            assert demo.stop(signal.SIGINT) == 0, demo.output
            assert "demo stopped (embedded PostgreSQL deleted)" in demo.output
            assert "Traceback" not in demo.output, demo.output
        assert not os.path.exists(workdir), "the embedded database's directory is removed"
        assert refuses(pg_port), "the embedded PostgreSQL is stopped"
        assert refuses(standby_port), "and its standby"

        # Spans went out over OTLP: the request (server) and its database operation (client).
        assert wait_until(lambda: bool(otlp.requests), 10)
        spans = otlp.spans()
        assert {service for service, _, _ in spans} == {"demo-under-test"}
        request = [a for _, name, a in spans if name == "GET /pg_version/"]
        assert request and request[0]["http.response.status_code"] == 200
        children = [
            (name, a)
            for _, name, a in spans
            if a["_parent_id"] == request[0]["_span_id"] and a.get("db.system.name")
        ]
        assert children and children[0][1]["db.system.name"] == "postgresql"
        assert children[0][1]["server.port"] == pg_port


def test_database_url_is_used_and_left_running(pg_server: PostgresServer) -> None:
    # A libpq-style URL: postgresql:// means asyncpg.
    url = pg_server.url(None)
    assert url.startswith("postgresql://")
    with demo_process(env={"DATABASE_URL": url}) as demo:
        assert pg_server.password not in demo.output, "the banner hides the password"
        assert "***" in demo.banner_value("database")
        with httpx.Client(base_url=demo.base_url, timeout=30) as client:
            assert client.get("/pg_version/").status_code == 200
            health = client.get("/health").json()
            assert health["database"]["embedded"] is False
            assert pg_server.password not in str(health)
        for command, why in (
            ("restart-db", "does not run its own database"),
            ("failover-db", "cannot fail over it"),
            ("chaos-db", "cannot run the chaos mix on it"),
        ):
            refused = run_demo(command, "--url", demo.base_url, timeout=60)
            assert refused.returncode == 1
            assert why in refused.stderr, refused.stderr
        assert demo.stop(signal.SIGTERM) == 0, demo.output
        assert "demo stopped" in demo.output
    assert pg_server.is_running, "a server the demo did not start is left alone"
    assert pg_server.execute("SELECT count(*) FROM demo_notes") == [("0",)]


def test_bad_settings_are_refused_by_name() -> None:
    result = run_demo(env={"DATABASE_URL": "mysql://u:hunter2@db/x", "DEMO_PORT": "0"}, timeout=60)
    assert result.returncode == 2
    assert "DATABASE_URL uses 'mysql'" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout

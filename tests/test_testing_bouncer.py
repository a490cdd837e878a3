"""The throwaway PgBouncer of ``fault_tolerant_pool.testing``, in front of a real PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from collections.abc import Callable

import pytest

from fault_tolerant_pool.testing import PgBouncer, PostgresServer, PsqlError

pytestmark = pytest.mark.db


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_runs_sql_through_pgbouncer_in_transaction_mode(
    pg_server: PostgresServer, pgbouncer: PgBouncer
) -> None:
    assert pgbouncer.port != pg_server.port
    assert pgbouncer.psql("SELECT current_user, 1") == [("postgres", "1")]
    pools = {(p["database"], p["user"]): p for p in pgbouncer.show("POOLS")}
    assert pools["postgres", "postgres"]["pool_mode"] == "transaction"
    config = {row["key"]: row["value"] for row in pgbouncer.show("CONFIG")}
    assert config["server_login_retry"] == "1"
    assert config["listen_port"] == str(pgbouncer.port)
    assert pgbouncer.url("psycopg") == (
        f"postgresql+psycopg://postgres:postgres-test-pw@127.0.0.1:{pgbouncer.port}/postgres"
    )


def test_application_users_log_in_through_scram(pg_server: PostgresServer) -> None:
    pg_server.create_role("app", "app pw")
    with PgBouncer(pg_server, users={"app": "app pw"}, pool_mode="session") as bouncer:
        assert bouncer.psql("SELECT current_user", user="app") == [("app",)]
        with pytest.raises(PsqlError, match="SASL authentication failed"):  # PgBouncer's words
            bouncer.psql("SELECT 1", user="app", password="wrong")
        assert bouncer.admin("SHOW USERS")  # the superuser is the admin


def test_pause_holds_queries_until_resume(pgbouncer: PgBouncer) -> None:
    assert pgbouncer.psql("SELECT 1") == [("1",)]  # a server connection exists to be paused
    assert pgbouncer.admin("PAUSE") == []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        query = pool.submit(pgbouncer.psql, "SELECT 'after pause'", timeout=10)
        time.sleep(0.3)
        assert not query.done()
        assert wait_until(lambda: any(p["cl_waiting"] != "0" for p in pgbouncer.show("POOLS")))
        pgbouncer.admin("RESUME")
        assert query.result(timeout=5) == [("after pause",)]


def test_restart_stop_modes_and_kill_keep_the_port(pgbouncer: PgBouncer) -> None:
    port = pgbouncer.port
    pgbouncer.restart()
    assert pgbouncer.port == port
    assert pgbouncer.psql("SELECT 1") == [("1",)]
    pgbouncer.stop("safe")
    assert not pgbouncer.is_running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((pgbouncer.host, port), timeout=1)
    pgbouncer.start()
    pgbouncer.kill()
    assert not pgbouncer.is_running
    pgbouncer.start()
    assert pgbouncer.psql("SELECT 2") == [("2",)]


def test_survives_a_postgres_restart(pg_server: PostgresServer, pgbouncer: PgBouncer) -> None:
    assert pgbouncer.psql("SELECT 1") == [("1",)]
    pg_server.restart()
    # The pooled server connection died with the server; the next transaction gets a new one.
    assert pgbouncer.psql("SELECT 2") == [("2",)]


def test_reload_applies_new_settings(pgbouncer: PgBouncer) -> None:
    pgbouncer.settings["default_pool_size"] = "7"
    pgbouncer.reload()

    def applied() -> bool:
        config = {row["key"]: row["value"] for row in pgbouncer.show("CONFIG")}
        return config["default_pool_size"] == "7"

    assert wait_until(applied)


def test_a_failed_start_says_why(pg_server: PostgresServer) -> None:
    bouncer = PgBouncer(pg_server, settings={"pool_mode": "nonsense"})
    try:
        with pytest.raises(Exception, match="pool_mode") as info:
            bouncer.start(timeout=10)
        assert "exited with code" in str(info.value)
        assert "nonsense" in bouncer.read_log()
    finally:
        bouncer.destroy()
    assert not os.path.exists(bouncer.workdir)

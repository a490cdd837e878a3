"""The throwaway PostgreSQL server of ``fault_tolerant_pool.testing`` against the real binaries."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from _fault_tolerant_pool_pytest import _require
from fault_tolerant_pool.testing import PostgresServer, PsqlError, ServerError, ServerUnavailable
from fault_tolerant_pool.testing.server import sqlalchemy_url

pytestmark = pytest.mark.db


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every 20 ms until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def refuses(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def hold_connection(server: PostgresServer, user: str, password: str) -> subprocess.Popen[str]:
    """A ``psql`` child that keeps one backend busy for 30 s."""
    env = {**os.environ, "PGPASSWORD": password}
    return subprocess.Popen(
        [str(server.bindir / "psql"), "-X", "-h", server.host, "-p", str(server.port),
         "-U", user, "-d", "postgres", "-c", "SELECT pg_sleep(30)"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_runs_sql_with_the_configured_settings(pg_server: PostgresServer) -> None:
    assert pg_server.is_running
    assert pg_server.execute("SELECT 1, 'two', NULL") == [("1", "two", "")]
    rows = pg_server.execute(
        "SELECT name, setting FROM pg_settings WHERE name IN ('lc_messages', 'fsync',"
        " 'max_connections', 'listen_addresses', 'unix_socket_directories', 'port')"
    )
    settings = {name: value for name, value in rows}
    assert settings == {
        "lc_messages": "C",
        "fsync": "off",
        "max_connections": "100",
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(pg_server.workdir),
        "port": str(pg_server.port),
    }
    assert pg_server.ready_at is not None
    assert "ready to accept connections" in pg_server.read_log()


def test_settings_and_max_connections_reach_the_server() -> None:
    with PostgresServer(max_connections=7, settings={"work_mem": "5MB"}) as server:
        rows = server.execute(
            "SELECT current_setting('max_connections'), current_setting('work_mem')"
        )
        assert rows == [("7", "5MB")]


@pytest.mark.parametrize("mode", ["fast", "smart", "immediate"])
def test_stop_modes_then_start_again(pg_server: PostgresServer, mode: str) -> None:
    port = pg_server.port
    pg_server.stop(mode)  # type: ignore[arg-type]
    assert not pg_server.is_running
    assert refuses(port)
    pg_server.start()
    assert pg_server.port == port
    assert pg_server.execute("SELECT 1") == [("1",)]


def test_fast_stop_ends_sessions_but_smart_waits_for_them(pg_server: PostgresServer) -> None:
    held = hold_connection(pg_server, pg_server.user, pg_server.password)
    try:
        assert wait_until(lambda: pg_server.backend_count() == 1)
        pg_server.stop("smart", wait=False)
        time.sleep(0.3)
        assert pg_server.is_running  # smart shutdown waits for the session...
        pg_server.stop("fast")  # ...fast shutdown ends it
        assert held.wait(5) != 0
        assert "terminating connection due to administrator command" in held.communicate()[1]
    finally:
        held.kill()
        held.wait()


def test_kill_crashes_and_the_next_start_recovers(pg_server: PostgresServer) -> None:
    pg_server.execute("CREATE TABLE t AS SELECT 42 AS x")
    held = hold_connection(pg_server, pg_server.user, pg_server.password)
    try:
        assert wait_until(lambda: pg_server.backend_count() == 1)
        pid = pg_server.pid
        assert pid is not None
        pg_server.kill()
        assert not pg_server.is_running
        assert refuses(pg_server.port)
        assert held.wait(5) != 0  # the client lost its connection without a goodbye
        assert "terminating connection" not in held.communicate()[1]
    finally:
        held.kill()
        held.wait()
    assert not os.path.exists(f"/proc/{pid}")  # reaped, no zombie
    pg_server.start()
    assert "automatic recovery in progress" in pg_server.read_log()
    assert pg_server.execute("SELECT x FROM t") == [("42",)]


def test_restart_keeps_the_port_and_stays_down_for_a_while(pg_server: PostgresServer) -> None:
    port, url = pg_server.port, pg_server.url()
    before = time.monotonic()
    pg_server.restart(down_for=0.3)
    assert pg_server.ready_at is not None and pg_server.ready_at - before >= 0.3
    assert (pg_server.port, pg_server.url()) == (port, url)
    assert pg_server.execute("SELECT 1") == [("1",)]


def test_start_in_the_background_and_wait_until_ready(pg_server: PostgresServer) -> None:
    pg_server.stop()
    pg_server.start(wait=False)
    ready_at = pg_server.wait_ready(timeout=10)
    assert ready_at == pg_server.ready_at
    assert pg_server.execute("SELECT 1") == [("1",)]


def test_roles_log_in_with_their_password(pg_server: PostgresServer) -> None:
    pg_server.create_role("app", "s3cret 'quoted'", connection_limit=3)
    pg_server.create_database("appdb", owner="app")
    rows = pg_server.psql("SELECT current_user, current_database()", "appdb", user="app",
                          password="s3cret 'quoted'")  # fmt: skip
    assert rows == [("app", "appdb")]
    assert pg_server.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'app'") == [("3",)]
    with pytest.raises(PsqlError, match="password authentication failed") as info:
        pg_server.psql("SELECT 1", user="app", password="wrong")
    assert "password authentication failed" in info.value.stderr


def test_backend_count_and_terminate_backends(pg_server: PostgresServer) -> None:
    pg_server.create_role("app", "pw")
    held = [hold_connection(pg_server, "app", "pw") for _ in range(2)]
    try:
        assert wait_until(lambda: pg_server.backend_count(user="app") == 2)
        assert pg_server.backend_count() == 2
        assert pg_server.backend_count(dbname="postgres", user=pg_server.user) == 0
        assert pg_server.terminate_backends(user="app") == 2
        for proc in held:
            assert proc.wait(5) != 0
        assert pg_server.backend_count() == 0
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


def test_two_servers_at_once(pg_server: PostgresServer) -> None:
    with PostgresServer() as other:
        assert other.port != pg_server.port
        assert other.workdir != pg_server.workdir
        other.execute("CREATE TABLE only_here (x int)")
        pg_server.stop()
        assert other.execute("SELECT count(*) FROM only_here") == [("0",)]
        pg_server.start()
        assert pg_server.execute("SELECT to_regclass('only_here') IS NULL") == [("t",)]


def test_destroy_leaves_nothing_behind() -> None:
    server = PostgresServer()
    server.start()
    pid = server.pid
    server.destroy()
    assert not server.workdir.exists()
    assert not os.path.exists(f"/proc/{pid}")
    assert not server.is_running


def test_start_errors_carry_the_log_tail() -> None:
    server = PostgresServer(settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(ServerError, match="invalid value for parameter") as info:
            server.start(timeout=10)
        assert "exited with code" in str(info.value)
        assert not server.is_running
    finally:
        server.destroy()


def test_urls_quote_the_credentials(pg_server: PostgresServer) -> None:
    url = sqlalchemy_url("psycopg_async", "us@r", "p@ss/w:rd%", "127.0.0.1", 5433, "db")
    assert url == "postgresql+psycopg_async://us%40r:p%40ss%2Fw%3Ard%25@127.0.0.1:5433/db"
    parts = urlsplit(pg_server.url(None, port=6000, dbname="other"))
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "postgresql", "127.0.0.1", 6000, "/other",
    )  # fmt: skip
    assert pg_server.url().startswith(f"postgresql+asyncpg://postgres:postgres-test-pw@127.0.0.1:"
                                      f"{pg_server.port}/postgres")  # fmt: skip


def test_missing_binaries_skip_outside_ci_and_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ServerUnavailable("no postgres here")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no postgres here"):
        _require(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _require(missing)
